"""What each command of `run.py` / `jaxtl` does, as library functions: the command line parses flags and calls
these; a notebook can call them too."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

import ml_collections
import numpy as np

from jaxtl.advice.auto import ADVICE_FILE, train_auto
from jaxtl.advice.matrix import decide
from jaxtl.advice.measure import measure
from jaxtl.advice.trials import adopt, run_trials
from jaxtl.config import CONFIG_FILE, base_config, load_resolved
from jaxtl.core import locations
from jaxtl.core.atomic import share
from jaxtl.core.errors import ConfigError, JaxtlError, MissingFileError
from jaxtl.core.paths import cache_dir
from jaxtl.core.processes import is_main
from jaxtl.core.sharding import make_mesh
from jaxtl.data.imagenet import imagenet_classes
from jaxtl.data.images import DEFAULT_MAX_PIXELS
from jaxtl.data.listing import SUFFIXES as LISTING_SUFFIXES
from jaxtl.features.api import extract_to_folder
from jaxtl.features.cache import cache_entry, cached_features, describe_backbone
from jaxtl.features.fewshot import DEFAULT_L2
from jaxtl.features.fewshot import fewshot as fewshot_eval
from jaxtl.features.predict import expand_image_paths, predict_top_k
from jaxtl.models.registry import get_model_spec
from jaxtl.report.html import build_report
from jaxtl.serving.export import export as export_model
from jaxtl.serving.onnx_runtime import OnnxModel, onnx_top_k
from jaxtl.train import plan as plans
from jaxtl.train.lr_find import lr_find as find_lr
from jaxtl.train.restore import evaluate_checkpoint, load_trained, recorded_thresholds
from jaxtl.train.run import train_and_evaluate
from jaxtl.train.workdir import workdir_at
from jaxtl.weights.create import create_backbone, create_model, get_preprocessing, resolve_weights

log = logging.getLogger("jaxtl")


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """`run.py train`: a run of `config` in `workdir` (resumed if it was started there); `auto` chooses its
    strategy first. Leaves `WORKDIR/report.html`. Returns the summary."""
    with workdir_at(workdir, writes=True, claim=True) as local:  # a URL: its mirror, copied up as the run goes
        summary = train_auto(config, local) if config.transfer.strategy == "auto" else train_and_evaluate(config, local)
        for name in (CONFIG_FILE, plans.RECORD_FILE, "summary.json", "metrics.jsonl", ADVICE_FILE):
            share(local / name)  # process 0 wrote them; the page reads them on every host (a bucket's mirrors)
        try:  # every process: restoring the kept model is collective (process 0 writes the page)
            build_report(local, summary)
        except JaxtlError as e:  # the run itself is complete and kept; only its page is missing
            log.warning("report.html not written (%s); the run is complete: `report --workdir %s` writes it", e,
                        workdir)
    return summary


def report(workdir: str | Path) -> Path:
    """`run.py report`: (re)builds `WORKDIR/report.html` from what the run left and its kept model
    (`jaxtl.report.html`)."""
    with workdir_at(workdir, writes=True) as local:
        page = build_report(local)
    return locations.join(workdir, page.name) if locations.is_url(str(workdir)) else page


def lr_find(config: ml_collections.ConfigDict, workdir: str | Path, steps: int = 100, start_lr: float = 1e-7,
            end_lr: float = 10.0) -> dict:
    """`run.py lr-find`: fastai's learning-rate sweep of `config` (`jaxtl.train.lr_find`)."""
    with workdir_at(workdir, writes=True) as local:
        return find_lr(config, local, steps, start_lr, end_lr)


def evaluate(workdir: str | Path, overrides: Sequence[str] = ()) -> dict:
    """`run.py eval`: val/test metrics of the kept model of a run, with its own config (optionally overridden)."""
    with workdir_at(workdir) as local:
        return evaluate_checkpoint(local, tuple(overrides))


def predict(images: Sequence[str | Path], *, model: str | None = None, weights: str = "default",
            workdir: str | Path | None = None, onnx: str | Path | None = None, top: int = 5, batch_size: int = 32,
            max_pixels: int = 0, exif: bool | None = None) -> Iterator[dict]:
    """`run.py predict`: the top classes of each image (files or folders), from a pretrained ImageNet classifier
    (`model`, `weights`), a trained run (`workdir`) or a model that run exported to ONNX (`onnx`, run by
    onnxruntime), as `{"path", "top": [{"index", "wnid", "label", "prob"}]}`. Photos are turned upright by their
    EXIF orientation as the run's `data.exif_orientation` says (default: yes), or as `exif` says."""
    if sum(map(bool, (model, workdir, onnx))) != 1:
        raise ConfigError("give one of --model (pretrained ImageNet classifier), --workdir (a trained run) or --onnx "
                          "(a model a run exported)")
    if model:
        get_model_spec(model)  # a misspelled model name fails before any file is read
    if onnx:
        exported = OnnxModel(onnx)
    files = expand_image_paths(images)
    if not files:
        raise MissingFileError(f"no image files found in {list(map(str, images))}")
    thresholds = None  # a multi-label run's: every label at or above its threshold is the image's
    if onnx:
        classes = [(None, name) for name in exported.classes]
        thresholds = exported.metadata.get("thresholds")
        predictions = onnx_top_k(exported, files, top_k=len(classes) if thresholds else min(top, len(classes)),
                                 batch_size=batch_size, max_pixels=max_pixels or None, exif=exif)
    else:
        tta = "none"  # a trained run's own eval.tta below
        if workdir:
            with workdir_at(workdir) as local:
                module, variables, prep, names = load_trained(local)
                run_config = load_resolved(local)
                thresholds = recorded_thresholds(local, run_config, len(names))
            classes = [(None, name) for name in names]
            run_data = run_config.data
            max_pixels = max_pixels or run_data.max_image_pixels
            exif = run_data.exif_orientation if exif is None else exif
            tta = run_config.eval.tta
        else:
            resolved = resolve_weights(model, weights)
            module, variables = create_model(model, resolved)
            prep = get_preprocessing(model, resolved)
            classes = imagenet_classes() if module.num_classes == len(imagenet_classes()) else None
        predictions = predict_top_k(module, variables, prep, files,
                                    top_k=module.num_classes if thresholds else min(top, module.num_classes),
                                    batch_size=batch_size, max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                                    exif=True if exif is None else exif, tta=tta, multi_label=bool(thresholds))
    for path, indices, probs in predictions:
        entries = [{"index": int(i), "wnid": classes[i][0] if classes else None,
                    "label": classes[i][1] if classes else str(int(i)), "prob": round(float(p), 6)}
                   for i, p in zip(indices, probs)]
        if thresholds:
            yield {"path": str(path), "labels": [e for e, p in zip(entries, probs) if p >= thresholds[e["index"]]],
                   "top": entries[:top]}
        else:
            yield {"path": str(path), "top": entries}


def export(workdir: str | Path, fmt: str, out: str | Path) -> dict:
    """`run.py export`: the kept model of `workdir` as an ONNX file, a TensorFlow SavedModel folder or a TFLite
    file at `out` (`jaxtl.serving.export`: uint8 NHWC images in, probabilities out). Returns its metadata."""
    with workdir_at(workdir) as local:
        return export_model(local, fmt, out)


def extract(model: str, weights: str | None, data: str | Path, layers: Sequence[str], out: str | Path, **kwargs
            ) -> dict:
    """`run.py extract`: named layers' features of every split of `data` to `.npy` files in `out`."""
    return extract_to_folder(model, weights, data, layers, out, progress=is_main(), **kwargs)


def advise(data: str | Path, model: str = "efficientnet_lite0", weights: str = "default", *, input_size: int = 0,
           val_fraction: float = 0.2, batch_size: int = 32, trial: bool = False, budget_minutes: float = 10.0,
           progress: bool = True, multi_label: bool = False) -> tuple[dict, str]:
    """`run.py advise`: the measured advice for `data` (a folder, or a `.csv`/`.jsonl` manifest: with
    `multi_label`, its several labels an image; with `trial`, the candidates tried and the winner named, nothing
    kept). Returns `(advice, dataset description)`."""
    get_model_spec(model)
    config = base_config()
    config.model.name, config.model.weights, config.data.path = model, weights, str(data)
    if str(data).endswith(LISTING_SUFFIXES):
        config.data.source = "manifest"
    elif multi_label:
        raise ConfigError(f"--multi-label: {data} is a folder, one class an image; several labels an image are "
                          "read from a .csv or .jsonl manifest")
    config.data.multi_label = multi_label
    config.data.val_fraction, config.data.input_size, config.train.batch_size = val_fraction, input_size, batch_size
    config.progress = progress
    dataset = plans.data_source(config).load()
    model_plan = plans.model_plan(config)
    start = time.perf_counter()
    advice = decide(measure(dataset, model, model_plan.weights, plans.preprocessing(config, model_plan),
                            batch_size=batch_size, progress=progress and is_main()), epochs=config.train.epochs)
    if trial:
        workdir = cache_dir() / "trials" / hashlib.sha256(str(dataset.source).encode()).hexdigest()[:16]
        trials = run_trials(config, dataset, advice, make_mesh(), workdir, budget_minutes,
                            spent_seconds=time.perf_counter() - start)
        trials.pop("run_dir")  # nothing kept: advise trains nothing
        advice = adopt(advice, trials)
    return advice, dataset.source


def fewshot(data: str | Path, model: str, weights: str = "default", *, shots: Sequence[int] = (1, 5, 10, 25),
            seeds: int = 3, layers: Sequence[str] = ("pre_logits",), input_size: int = 0, val_fraction: float = 0.2,
            batch_size: int = 64, l2: float = DEFAULT_L2, knn: int = 0, progress: bool = True) -> dict:
    """`run.py fewshot`: few-shot linear evaluation (`jaxtl.features.fewshot`) of the pretrained backbone's pooled
    `layers` (concatenated; from the feature cache) on `data`: shots drawn from its train split, scored on its test
    split, else its val split (carved from train, seeded, when the folder has neither)."""
    get_model_spec(model)
    if not shots or min(shots) < 1 or seeds < 1:
        raise ConfigError(f"fewshot: --shots {','.join(map(str, shots))} --seeds {seeds}: give positive shot counts "
                          "(e.g. 1,5,10,25) and at least one seed")
    config = base_config()
    config.model.name, config.model.weights, config.data.path = model, weights, str(data)
    config.data.val_fraction, config.data.input_size = val_fraction, input_size
    dataset = plans.data_source(config).load()
    model_plan = plans.model_plan(config)
    if model_plan.weights is None:
        raise ConfigError("fewshot evaluates pretrained features; give pretrained weights, not None")
    prep = plans.preprocessing(config, model_plan)
    backbone, variables = create_backbone(model, model_plan.weights)
    description = describe_backbone(model, model_plan.weights, {}, "float32")
    held_out = next((split for split in ("test", "val") if len(dataset.splits.get(split, ()))), None)
    if held_out is None:
        raise ConfigError(f"fewshot scores on a test or val split, and {data} has neither (--val-fraction "
                          f"{val_fraction:g} carves no val images from its {len(dataset.splits['train'])} training "
                          "images): give --val-fraction above 0 (e.g. 0.2), or a folder with val/ or test/")
    mesh, features = make_mesh(), {}
    for split in ("train", held_out):
        arrays, labels = cached_features(cache_entry(description, prep, dataset.splits[split]), backbone, variables,
                                         dataset.splits[split], prep, tuple(layers), batch_size=batch_size,
                                         mesh=mesh, progress=progress and is_main(), desc=f"features {split}")
        features[split] = np.concatenate([np.asarray(arrays[layer]) for layer in layers], axis=1), labels
    start = time.perf_counter()
    result = fewshot_eval(*features["train"], *features[held_out], dataset.num_classes, sorted(set(shots)), seeds,
                          l2, knn)
    return {"model": model, "weights": model_plan.weights.name, "data": str(dataset.source), "layers": list(layers),
            "input_size": prep.input_size, "classes": dataset.num_classes, "split": held_out,
            "eval_images": len(dataset.splits[held_out]), "train_images": len(dataset.splits["train"]),
            "seeds": seeds, "l2": l2, "knn": knn, **result, "seconds": round(time.perf_counter() - start, 2)}


def config_reference() -> str:
    """The configuration reference (`docs/config.md`) in Markdown: every key of `jaxtl.config.KEYS` with what it
    means, its type (its default's: an override must have it, or an int for a float), default, the values it takes,
    and which strategies read it (its declaration's `read_by`; `auto` reads its own keys, then those of the strategy
    it chooses)."""
    from jaxtl.config import KEYS
    from jaxtl.transfer.strategies import STRATEGIES

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    def default(value) -> str:
        return "`{}`" if isinstance(value, ml_collections.ConfigDict) else f"`{value!r}`"

    def kind(value) -> str:
        return "dict" if isinstance(value, ml_collections.ConfigDict) else type(value).__name__

    every = set(STRATEGIES)
    lines = ["# Configuration reference", "",
             "Every key of a run's config (`jaxtl.config.KEYS`, where each is declared once): what it means, its "
             "type, default, the values it takes and which strategies read it. A key set to other than its default "
             "that the run's strategy never reads is an error naming it. Generated by "
             "`python docs/make_config_reference.py`; "
             "`tests/test_config.py` checks it is current.", "",
             "| key | meaning | type | default | allowed | read by |", "|---|---|---|---|---|---|"]
    for name, key in KEYS.items():
        read = {strategy for strategy in (*STRATEGIES, "auto") if key.read_by_strategy(strategy)}
        by = "every run" if every <= read else ", ".join(sorted(read))
        lines.append(f"| `{name}` | {cell(key.doc)} | {kind(key.default)} | {cell(default(key.default))} | "
                     f"{cell(key.allowed or 'any')} | {cell(by)} |")
    return "\n".join(lines) + "\n"
