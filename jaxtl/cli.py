"""The `run.py` command line. Kept thin: each subcommand parses its flags and calls the library."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from typing import Sequence

from tqdm import tqdm

from jaxtl.create import DEFAULT_WEIGHTS, create_model, get_preprocessing
from jaxtl.data.imagenet import imagenet_classes
from jaxtl.data.preprocess import DEFAULT_MAX_PIXELS
from jaxtl.errors import ConfigError, JaxtlError, MissingFileError
from jaxtl.inference import expand_image_paths, predict_top_k
from jaxtl.models.registry import MODELS, get_model_spec


def _add_predict(subparsers) -> None:
    p = subparsers.add_parser("predict", help="top-k ImageNet classes of images (files or folders)")
    p.add_argument("--model", help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--workdir", help="predict with the best checkpoint of a finished `train` run and its class names")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help="registered weights id, 'default' (the model's default weights) or a .pth/.safetensors file")
    p.add_argument("--top", type=int, default=5, help="how many classes to show per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--max-image-pixels", type=int, default=0,
                   help=f"refuse larger images (default: the run's data.max_image_pixels, else {DEFAULT_MAX_PIXELS})")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.set_defaults(func=predict)


def predict(args: argparse.Namespace) -> None:
    if bool(args.model) == bool(args.workdir):
        raise ConfigError("give either --model (pretrained ImageNet classifier) or --workdir (a trained run)")
    if args.model:
        get_model_spec(args.model)  # a misspelled model name fails before any file is read
    files = expand_image_paths(args.images)
    if not files:
        raise MissingFileError(f"no image files found in {args.images}")
    max_pixels = args.max_image_pixels or DEFAULT_MAX_PIXELS
    if args.workdir:
        from jaxtl.config import load_resolved
        from jaxtl.train.loop import load_trained

        model, variables, prep, names = load_trained(args.workdir)
        classes = [(None, name) for name in names]
        max_pixels = args.max_image_pixels or load_resolved(args.workdir).data.max_image_pixels
    else:
        model, variables = create_model(args.model, args.weights)
        prep = get_preprocessing(args.model, args.weights)
        classes = imagenet_classes() if model.num_classes == len(imagenet_classes()) else None
    top = min(args.top, model.num_classes)
    results = predict_top_k(model, variables, prep, files, top_k=top, batch_size=args.batch_size,
                            max_pixels=max_pixels)
    for path, indices, probs in tqdm(results, total=len(files), desc="predict", unit="img", file=sys.stderr,
                                     disable=len(files) < 2 * args.batch_size):
        top_list = [
            {"index": int(i), "wnid": classes[i][0] if classes else None,
             "label": classes[i][1] if classes else str(int(i)), "prob": round(float(p), 6)}
            for i, p in zip(indices, probs)
        ]
        if args.json:
            print(json.dumps({"path": str(path), "top": top_list}), flush=True)
        else:
            print(path)
            for rank, entry in enumerate(top_list, 1):
                print(f"  {rank}. {entry['prob']:6.3f}  {entry['wnid'] or '':9}  {entry['label']}")


def _add_extract(subparsers) -> None:
    p = subparsers.add_parser("extract", help="features of named layers of a dataset's images, one pass, to .npy files")
    p.add_argument("--model", required=True, help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="as for predict")
    p.add_argument("--data", required=True,
                   help="a folder of class sub-folders (optionally under train/val/test), or of images")
    p.add_argument("--layers", default="pre_logits",
                   help="comma-separated backbone features, e.g. stem, stage1..stage4, pre_logits (default pre_logits)")
    p.add_argument("--maps", action="store_true", help="full (N, H, W, C) maps instead of global-average pooled")
    p.add_argument("--input-size", type=int, default=0, help="image side (default: the weights' own)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="decode in this many worker processes (default: threads)")
    p.add_argument("--out", required=True, help="writes OUT/<split>/<layer>.<pooled|map>.npy, labels.npy, "
                                                "files.txt and OUT/meta.json")
    _add_distributed(p)
    p.set_defaults(func=extract)


def extract(args: argparse.Namespace) -> None:
    from jaxtl.distributed import is_main
    from jaxtl.features.api import extract_to_folder

    _join(args)
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    meta = extract_to_folder(args.model, args.weights, args.data, layers, args.out, pool=not args.maps,
                             input_size=args.input_size, batch_size=args.batch_size, progress=is_main(),
                             workers=args.workers)
    if is_main():
        print(json.dumps({"out": str(args.out), "splits": meta["splits"], "shapes": meta["shapes"]}))


def _add_advise(subparsers) -> None:
    p = subparsers.add_parser("advise", help="measure a dataset against the pretrained model and recommend a strategy")
    p.add_argument("--data", required=True, help="a folder of class sub-folders (optionally under train/val/test)")
    p.add_argument("--model", default="efficientnet_lite0", help=f"one of: {', '.join(MODELS)} (default "
                                                                 "efficientnet_lite0)")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="as for predict; must be pretrained")
    p.add_argument("--input-size", type=int, default=0, help="image side (default: the weights' own)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="val share of a folder without split folders (seeded, stratified; default 0.2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the advice and every measurement as JSON")
    p.add_argument("--trial", action="store_true", help="also try the cell's candidates on val (probes; for "
                                                        "medium and large data, short fine-tuning runs) and name "
                                                        "the winner, without training it")
    p.add_argument("--budget-minutes", type=float, default=10.0, help="time for the trials (default 10)")
    _add_distributed(p)
    p.set_defaults(func=advise)


def advise(args: argparse.Namespace) -> None:
    from jaxtl.advice.matrix import decide, format_advice
    from jaxtl.advice.measure import measure
    from jaxtl.config import base_config
    from jaxtl.data.sources import load_dataset
    from jaxtl.distributed import is_main

    _join(args)
    get_model_spec(args.model)
    config = base_config()
    config.model.name, config.model.weights, config.data.path = args.model, args.weights, args.data
    config.data.val_fraction, config.data.input_size, config.train.batch_size = (
        args.val_fraction, args.input_size, args.batch_size)
    config.progress = not args.json
    dataset = load_dataset(config.data, seed=0)
    prep = get_preprocessing(args.model, args.weights)
    prep = prep.with_input_size(args.input_size) if args.input_size else prep
    start = time.perf_counter()
    advice = decide(measure(dataset, args.model, args.weights, prep, batch_size=args.batch_size,
                            progress=config.progress and is_main()), epochs=config.train.epochs)
    if args.trial:
        from jaxtl.advice.trials import adopt, run_trials
        from jaxtl.sharding import make_mesh
        from jaxtl.weights.files import cache_dir

        workdir = cache_dir() / "trials" / hashlib.sha256(str(dataset.source).encode()).hexdigest()[:16]
        trials = run_trials(config, dataset, advice, make_mesh(), workdir, args.budget_minutes,
                            spent_seconds=time.perf_counter() - start)
        trials.pop("run_dir")  # nothing kept: advise trains nothing
        advice = adopt(advice, trials)
    if is_main():
        print(json.dumps(advice, indent=2) if args.json else format_advice(advice, dataset.source))


def _add_distributed(parser) -> None:
    group = parser.add_argument_group("multi-process jobs", "every process runs the same command; on Cloud TPU, "
                                      "SLURM and Open MPI the job is detected and these are not needed")
    group.add_argument("--coordinator", help="HOST:PORT of process 0 (or JAXTL_COORDINATOR)")
    group.add_argument("--num-processes", type=int, help="processes in the job (or JAXTL_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, help="this process, 0..N-1 (or JAXTL_PROCESS_ID)")


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train (or resume) a classifier from a config; writes checkpoints, "
                                            "metrics, the resolved config and a summary")
    p.add_argument("--config", required=True, help="a configs/*.py file with get_config(), optionally with a "
                                                   "variant: configs/ants_bees.py:finetune_top")
    p.add_argument("--workdir", required=True, help="checkpoints, config.json, metrics.jsonl, summary.json and "
                                                    "plots go here")
    p.add_argument("--strategy", help="shorthand for --config.transfer.strategy=...; 'auto' measures the data "
                                      "and follows `advise`")
    _add_distributed(p)
    p.set_defaults(func=train)
    p = subparsers.add_parser("eval", help="evaluate the best checkpoint of a workdir on its val/test splits, with "
                                           "the run's own config (WORKDIR/config.json)")
    p.add_argument("--workdir", required=True, help="the workdir of a `train` run")
    _add_distributed(p)
    p.set_defaults(func=evaluate_best)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (so redirected or captured stderr gets the lines)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _log_to_stderr() -> None:
    """jaxtl's INFO logs on stderr (absl installs its own root handler, so basicConfig would do nothing); in a
    multi-process job, process 0's, and the others' warnings and errors tagged with their process index."""
    import jax

    logger = logging.getLogger("jaxtl")
    if not logger.handlers:
        handler = _StderrHandler()
        logger.addHandler(handler)
        logger.propagate = False
    index = jax.process_index() if jax.process_count() > 1 else None
    tag = "" if index is None else f"[process {index}] "
    for handler in logger.handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(message)s", "%H:%M:%S"))
    logger.setLevel(logging.INFO if not index else logging.WARNING)


def _config(args: argparse.Namespace):
    from jaxtl.config import apply_overrides, load_config

    strategy = [f"transfer.strategy={args.strategy}"] if args.strategy else []
    return apply_overrides(load_config(args.config), [*strategy, *args.overrides])


def train(args: argparse.Namespace) -> None:
    from jaxtl.distributed import is_main
    from jaxtl.train.loop import train_and_evaluate
    from jaxtl.train.preemption import Preempted

    config = _config(args)  # a bad config is reported before joining a job
    _join(args)
    try:
        summary = train_and_evaluate(config, args.workdir)
    except Preempted as e:
        logging.getLogger("jaxtl").warning("%s", e)
        return
    keys = ("best_val_accuracy", "final_val_accuracy", "test_accuracy", "epochs", "train_seconds")
    if is_main():
        print(json.dumps({k: summary[k] for k in keys if k in summary}))


def evaluate_best(args: argparse.Namespace) -> None:
    from jaxtl.distributed import is_main
    from jaxtl.train.loop import evaluate_checkpoint

    _join(args)
    result = evaluate_checkpoint(args.workdir, tuple(args.overrides))
    if is_main():
        print(json.dumps(result))


def _join(args: argparse.Namespace) -> None:
    """Joins the multi-process job (if any), then sets up logging for this process."""
    from jaxtl.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)
    _log_to_stderr()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="run.py", description="jaxtl: transfer learning with JAX/Flax backbones",
        epilog="train/eval accept config overrides as --config.KEY=VALUE, e.g. --config.train.epochs=3. Errors "
               "that are yours to fix are one line and exit code 2.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_predict(subparsers)
    _add_train(subparsers)
    _add_extract(subparsers)
    _add_advise(subparsers)
    args, unknown = parser.parse_known_args(argv)
    args.overrides = []
    for flag in unknown:
        if not flag.startswith("--config.") or args.command not in ("train", "eval"):
            parser.error(f"unrecognized argument '{flag}'")
        args.overrides.append(flag.removeprefix("--config."))
    try:
        args.func(args)
    except JaxtlError as e:  # the user's to fix; anything else is a bug and keeps its traceback
        parser.exit(2, f"run.py {args.command}: error: {e}\n")
