"""The command line (`run.py`, `jaxtl`): each subcommand parses its flags and calls `jaxtl.commands`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Sequence

from jaxtl import commands
from jaxtl.advice.matrix import format_advice
from jaxtl.config import apply_overrides, load_config
from jaxtl.core.atomic import json_text
from jaxtl.core.errors import ConfigError, JaxtlError
from jaxtl.core.processes import initialize, is_main
from jaxtl.data.images import DEFAULT_MAX_PIXELS
from jaxtl.features.fewshot import DEFAULT_L2
from jaxtl.models.registry import MODELS
from jaxtl.serving.export import FORMATS
from jaxtl.train.preemption import Preempted
from jaxtl.weights.create import DEFAULT_WEIGHTS

log = logging.getLogger("jaxtl")


def whole(minimum: int):
    """An argparse type: a whole number >= `minimum` (argparse names the option and exits 2 on anything else)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: give a whole number >= {minimum}")
        return value
    return parse


def positive(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number > 0") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g}: give a number > 0")
    return value


def _add_predict(subparsers) -> None:
    p = subparsers.add_parser("predict", help="top-k classes of images (files or folders)")
    p.add_argument("--model", help=f"a pretrained ImageNet classifier: one of {', '.join(MODELS)}")
    p.add_argument("--workdir", help="predict with the kept model of a `train` run and its class names")
    p.add_argument("--onnx", help="predict with an ONNX model `export` wrote (onnxruntime; jaxtl's host resizing)")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help="registered weights id, 'default' (the model's default weights) or a .pth/.safetensors file")
    p.add_argument("--top", type=whole(1), default=5, help="how many classes to show per image (default 5)")
    p.add_argument("--batch-size", type=whole(1), default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--max-image-pixels", type=whole(0), default=0,
                   help=f"refuse larger images (default: the run's data.max_image_pixels, else {DEFAULT_MAX_PIXELS})")
    p.add_argument("--ignore-exif", action="store_true",
                   help="do not turn photos upright by their EXIF orientation (default: as the run did; else do)")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.set_defaults(func=predict)


def predict(args: argparse.Namespace) -> None:
    results = commands.predict(args.images, model=args.model, weights=args.weights, workdir=args.workdir,
                               onnx=args.onnx, top=args.top, batch_size=args.batch_size,
                               max_pixels=args.max_image_pixels, exif=False if args.ignore_exif else None)
    for result in results:
        if args.json:
            print(json_text(result, indent=None), flush=True)
        else:
            print(result["path"])
            if "labels" in result:  # multi-label: every label at or above its threshold
                print("  labels: " + (", ".join(f"{e['label']} ({e['prob']:.3f})" for e in result["labels"])
                                      or "none above their thresholds"))
            for rank, entry in enumerate(result["top"], 1):
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
    p.add_argument("--input-size", type=whole(0), default=0, help="image side (default: the weights' own)")
    p.add_argument("--batch-size", type=whole(1), default=64)
    p.add_argument("--workers", type=whole(0), default=0,
                   help="decode in this many worker processes (default: threads)")
    p.add_argument("--ignore-exif", action="store_true", help="do not turn photos upright by their EXIF orientation")
    p.add_argument("--out", required=True, help="writes OUT/<split>/<layer>.<pooled|map>.npy, labels.npy, "
                                                "files.txt and OUT/meta.json")
    _add_distributed(p)
    p.set_defaults(func=extract)


def extract(args: argparse.Namespace) -> None:
    _join(args)
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    meta = commands.extract(args.model, args.weights, args.data, layers, args.out, pool=not args.maps,
                            input_size=args.input_size, batch_size=args.batch_size, workers=args.workers,
                            exif=not args.ignore_exif)
    if is_main():
        print(json_text({"out": str(args.out), "splits": meta["splits"], "shapes": meta["shapes"]}, indent=None))


def _add_advise(subparsers) -> None:
    p = subparsers.add_parser("advise", help="measure a dataset against the pretrained model and recommend a strategy")
    p.add_argument("--data", required=True, help="a folder of class sub-folders (optionally under train/val/test), "
                                                 "or a .csv/.jsonl manifest of paths and labels; local or a URL")
    p.add_argument("--multi-label", action="store_true", help="a manifest's several labels an image "
                                                                "(data.multi_label; labels separated by spaces)")
    p.add_argument("--model", default="efficientnet_lite0", help=f"one of: {', '.join(MODELS)} (default "
                                                                 "efficientnet_lite0)")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="as for predict; must be pretrained")
    p.add_argument("--input-size", type=whole(0), default=0, help="image side (default: the weights' own)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="val share of a folder without split folders (seeded, stratified; default 0.2)")
    p.add_argument("--batch-size", type=whole(1), default=32)
    p.add_argument("--json", action="store_true", help="print the advice and every measurement as JSON")
    p.add_argument("--trial", action="store_true", help="also try the cell's candidates on val (probes; for "
                                                        "medium and large data, short fine-tuning runs) and name "
                                                        "the winner, without training it")
    p.add_argument("--budget-minutes", type=positive, default=10.0, help="time for the trials (default 10)")
    _add_distributed(p)
    p.set_defaults(func=advise)


def advise(args: argparse.Namespace) -> None:
    _join(args)
    advice, source = commands.advise(args.data, args.model, args.weights, input_size=args.input_size,
                                     val_fraction=args.val_fraction, batch_size=args.batch_size, trial=args.trial,
                                     budget_minutes=args.budget_minutes, progress=not args.json,
                                     multi_label=args.multi_label)
    if is_main():
        print(json_text(advice) if args.json else format_advice(advice, source))


def _add_fewshot(subparsers) -> None:
    p = subparsers.add_parser("fewshot", help="few-shot linear evaluation of a pretrained backbone's features: "
                                              "closed-form ridge regression at 1, 5, 10, 25 shots over seeds")
    p.add_argument("--model", required=True, help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="as for predict; must be pretrained")
    p.add_argument("--data", required=True, help="a folder of class sub-folders (optionally under train/val/test): "
                                                 "shots from train, scored on test (else val)")
    p.add_argument("--shots", default="1,5,10,25", help="comma-separated images per class (default 1,5,10,25)")
    p.add_argument("--seeds", type=whole(1), default=3, help="draws of the shots to average over (default 3)")
    p.add_argument("--layers", default="pre_logits", help="comma-separated pooled features, concatenated")
    p.add_argument("--knn", type=whole(0), default=0, help="also a cosine k-nearest-neighbour vote with this k")
    p.add_argument("--l2", type=float, default=DEFAULT_L2, help="ridge strength (default 2^10, big_vision's)")
    p.add_argument("--input-size", type=whole(0), default=0, help="image side (default: the weights' own)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="held-out share of a folder without split folders (seeded, stratified; default 0.2)")
    p.add_argument("--batch-size", type=whole(1), default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object (`accuracy`: {shots: mean}, ...)")
    _add_distributed(p)
    p.set_defaults(func=fewshot)


def fewshot(args: argparse.Namespace) -> None:
    _join(args)
    try:
        shots = [int(s) for s in args.shots.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--shots {args.shots!r}: give comma-separated positive integers, e.g. 1,5,10,25") from None
    result = commands.fewshot(args.data, args.model, args.weights, shots=shots, seeds=args.seeds,
                              layers=[n.strip() for n in args.layers.split(",") if n.strip()],
                              input_size=args.input_size, val_fraction=args.val_fraction, batch_size=args.batch_size,
                              l2=args.l2, knn=args.knn, progress=not args.json)
    if not is_main():
        return
    if args.json:
        print(json_text(result, indent=None))
        return
    print(f"{result['model']} ({result['weights']}), {', '.join(result['layers'])}: {result['classes']} classes, "
          f"scored on {result['split']} ({result['eval_images']} images), {result['seeds']} seeds")
    print(f"{'shots':>6s} {'ridge':>14s}" + (f" {'kNN (k=' + str(result['knn']) + ')':>14s}" if result["knn"] else ""))
    for n, mean in result["accuracy"].items():
        knn = f" {result['knn_accuracy'][n]:8.3f} ± {result['knn_std'][n]:.3f}" if result["knn"] else ""
        fewest = result["fewest_per_class"][n]
        capped = f"   (the scarcest class has {fewest}: all of them)" if fewest < n else ""
        print(f"{n:>6d} {mean:8.3f} ± {result['std'][n]:.3f}{knn}{capped}")


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
                                                    "plots go here: a folder, or a URL (gs://...) for one process")
    p.add_argument("--strategy", help="shorthand for --config.transfer.strategy=...; 'auto' measures the data "
                                      "and follows `advise`")
    _add_distributed(p)
    p.set_defaults(func=train)
    p = subparsers.add_parser("eval", help="evaluate the kept model of a workdir on its val/test splits, with the "
                                           "run's own config (WORKDIR/config.json)")
    p.add_argument("--workdir", required=True, help="the workdir of a `train` run")
    _add_distributed(p)
    p.set_defaults(func=evaluate)


def _add_export(subparsers) -> None:
    p = subparsers.add_parser("export", help="write the kept model of a workdir for serving: uint8 NHWC images at "
                                             "its input size in, class probabilities out")
    p.add_argument("--workdir", required=True, help="the workdir of a `train` run")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx (a file), savedmodel (a TensorFlow SavedModel folder) or tflite (a file)")
    p.add_argument("--out", required=True, help="where to write it (replaced only once the export is complete; "
                                                "a SavedModel replaces only an empty folder or an earlier export)")
    p.set_defaults(func=export)


def export(args: argparse.Namespace) -> None:
    _log_to_stderr()
    meta = commands.export(args.workdir, args.format, args.out)
    size = meta["input"]["shape"][1]
    print(f"wrote {args.out} ({args.format}): uint8 RGB (batch, {size}, {size}, 3) -> probabilities over "
          f"{len(meta['classes'])} classes; on the host: {meta['input']['host']}")


def _add_report(subparsers) -> None:
    p = subparsers.add_parser("report", help="(re)build WORKDIR/report.html: config, advice, curves, confusion "
                                             "matrix, per-class accuracy, confidently wrong images, Grad-CAM")
    p.add_argument("--workdir", required=True, help="the workdir of a finished `train` run")
    p.set_defaults(func=report)


def report(args: argparse.Namespace) -> None:
    _log_to_stderr()
    print(f"wrote {commands.report(args.workdir)}")


def _add_lr_find(subparsers) -> None:
    p = subparsers.add_parser("lr-find", help="sweep the learning rate exponentially over a few hundred steps from "
                                              "the config's starting state; plot lr_find.png and suggest an LR")
    p.add_argument("--config", required=True, help="a configs/*.py file (a fine-tuning strategy), as for train")
    p.add_argument("--workdir", required=True, help="lr_find.png and lr_find.json go here")
    p.add_argument("--steps", type=whole(1), default=100, help="steps of the sweep (default 100)")
    p.add_argument("--start-lr", type=positive, default=1e-7)
    p.add_argument("--end-lr", type=positive, default=10.0)
    _add_distributed(p)
    p.set_defaults(func=lr_find)


def lr_find(args: argparse.Namespace) -> None:
    config = apply_overrides(load_config(args.config), args.overrides)
    _join(args)
    result = commands.lr_find(config, args.workdir, args.steps, args.start_lr, args.end_lr)
    if is_main():
        print(json_text({k: result[k] for k in ("suggested_lr", "min_loss_lr")} | {"steps": len(result["lrs"])},
                        indent=None))


def train(args: argparse.Namespace) -> None:
    strategy = [f"transfer.strategy={args.strategy}"] if args.strategy else []
    config = apply_overrides(load_config(args.config), [*strategy, *args.overrides])  # before joining a job
    _join(args)
    try:
        summary = commands.train(config, args.workdir)
    except Preempted as e:
        log.warning("%s", e)
        if e.signum == signal.SIGINT:
            sys.exit(130)  # interrupted by the user: the shell's convention
        return
    keys = ("best_val_accuracy", "final_val_accuracy", "test_accuracy", "best_val_map", "final_val_map", "test_map",
            "epochs", "train_seconds")
    if is_main():
        print(json_text({k: summary[k] for k in keys if k in summary}, indent=None))


def evaluate(args: argparse.Namespace) -> None:
    _join(args)
    result = commands.evaluate(args.workdir, args.overrides)
    if is_main():
        print(json_text(result, indent=None))


class _WithoutClosedLoopTracebacks:
    """`sys.stderr` less the tracebacks TensorStore prints ("RuntimeError: Event loop is closed", one per write still
    in flight, from as many threads) when an orbax save fails, say on a full disk: jaxtl reports that failure itself,
    in one line. Each thread's traceback is held until its last line decides; every other traceback, and
    everything else, passes as written."""

    HEADER = "Traceback (most recent call last):"
    NOISE = "RuntimeError: Event loop is closed"

    def __init__(self, stream):
        self._stream, self._held, self._lock = stream, {}, threading.Lock()

    def write(self, text: str) -> int:
        thread = threading.get_ident()
        with self._lock:
            held = self._held.pop(thread, None)
            if held is None and self.HEADER not in text:
                return self._stream.write(text)
            if held is None:
                before, _, rest = text.partition(self.HEADER)
                self._stream.write(before)
                held = self.HEADER + rest
            else:
                held += text
            lines = held.split("\n")
            done = next((i for i, line in enumerate(lines[1:-1], 1) if line and not line[0].isspace()), None)
            if done is None:
                self._held[thread] = held
                return len(text)
            if lines[done].strip() != self.NOISE:  # the exception's own line ends the block
                self._stream.write("\n".join(lines[: done + 1]) + "\n")
            rest = "\n".join(lines[done + 1 :])
        if rest:
            self.write(rest)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _quiet_interrupts(hook):
    """An unraisable-exception hook that passes over a Ctrl-C Python could not raise where it landed (a garbage
    collection callback): the training loop stops at its next step instead; and over an asyncio event loop that
    fails to close while the interpreter exits after a second Ctrl-C."""
    def quiet(unraisable):
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            return
        if getattr(unraisable.object, "__qualname__", "").endswith("EventLoop.__del__"):
            return  # a checkpoint writer's event loop finalised at exit after an interrupt: not jaxtl's, harmless
        hook(unraisable)

    return quiet


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

    if not log.handlers:
        log.addHandler(_StderrHandler())
        log.propagate = False
    # orbax (through absl, and asyncio's leftover tasks) logs the traceback of a failed background write itself;
    # jaxtl reports it as one line
    for noisy in ("absl", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    if not isinstance(sys.stderr, _WithoutClosedLoopTracebacks):
        sys.stderr = _WithoutClosedLoopTracebacks(sys.stderr)
        sys.unraisablehook = _quiet_interrupts(sys.unraisablehook)
    index = jax.process_index() if jax.process_count() > 1 else None
    tag = "" if index is None else f"[process {index}] "
    for handler in log.handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(message)s", "%H:%M:%S"))
    log.setLevel(logging.INFO if not index else logging.WARNING)


def _join(args: argparse.Namespace) -> None:
    """Joins the multi-process job (if any), then sets up logging for this process."""
    initialize(args.coordinator, args.num_processes, args.process_id)
    _log_to_stderr()


def main(argv: Sequence[str] | None = None) -> None:
    prog = os.path.basename(sys.argv[0]) if argv is None and sys.argv and sys.argv[0] else "jaxtl"
    parser = argparse.ArgumentParser(
        prog=prog if prog in ("run.py", "jaxtl") else "jaxtl",
        description="jaxtl: transfer learning with JAX/Flax backbones",
        epilog="train, eval and lr-find accept config overrides as --config.KEY=VALUE, e.g. "
               "--config.train.epochs=3. Errors that are yours to fix are one line and exit code 2.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_predict(subparsers)
    _add_train(subparsers)
    _add_extract(subparsers)
    _add_advise(subparsers)
    _add_fewshot(subparsers)
    _add_lr_find(subparsers)
    _add_export(subparsers)
    _add_report(subparsers)
    args, unknown = parser.parse_known_args(argv)
    args.overrides = []
    for flag in unknown:
        if not flag.startswith("--config.") or args.command not in ("train", "eval", "lr-find"):
            parser.error(f"unrecognized argument '{flag}'")
        args.overrides.append(flag.removeprefix("--config."))
    try:
        args.func(args)
    except JaxtlError as e:  # the user's to fix; anything else is a bug and keeps its traceback
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, or a second one inside it
        parser.exit(130, f"{parser.prog} {args.command}: interrupted: files already written are complete (caches "
                         "and checkpoints are published whole); run the same command again to go on\n")
