"""A finished (or running) run's kept model, back from its workdir: for `eval` (its val/test metrics with the
run's own config) and `predict --workdir` (the module, variables, preprocessing and class names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtl.config import apply_overrides, check_values, load_resolved
from jaxtl.core.atomic import read_json
from jaxtl.core.errors import ConfigError, MissingFileError
from jaxtl.core.paths import cache_dir
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.sharding import make_mesh, replicated
from jaxtl.data.decoded import decoded_dataset
from jaxtl.data.pipeline import Augment
from jaxtl.models.lora import has_lora, merge_lora
from jaxtl.train import plan as plans
from jaxtl.train.checkpoints import Checkpoints, checkpoint_root
from jaxtl.train.evaluate import evaluate_split
from jaxtl.train.inputs import ImageSource
from jaxtl.train.steps import TrainState, make_eval_step


def _restored(restored: dict, lora_scale: float = 0.0) -> TrainState:
    """The run's model for evaluation from a checkpoint restored as plain arrays (no optimizer state needed): its
    EMA weights when the run kept an EMA (`train.ema_decay`), LoRA factors merged into plain kernels."""
    restored = jax.tree_util.tree_map(np.asarray, restored)
    state = TrainState(step=restored["step"], params=restored["params"], batch_stats=restored.get("batch_stats", {}),
                       opt_state=None, rng=restored["rng"], ema=restored.get("ema") or {}).kept
    if has_lora(state.params):
        state = state.replace(params=jax.tree_util.tree_map(np.asarray, merge_lora(state.params, lora_scale)))
    return state


def _kept(workdir: Path) -> tuple[dict, dict]:
    """The kept model's state (plain arrays) and meta: the best checkpoint, or the latest if it is damaged."""
    best = checkpoint_root(workdir) / "best"  # (in the bucket, for a bucket workdir of several processes)
    if not best.is_dir():
        raise MissingFileError(f"no kept model in {best} yet; run (or resume) `train` with --workdir {workdir}")
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        if checkpoints.latest_step(checkpoints.best) is None and checkpoints.latest_step() is None:
            raise MissingFileError(f"no kept model in {best} yet; run (or resume) `train` with --workdir {workdir}")
        return checkpoints.restore_kept()
    finally:
        checkpoints.close()


def recorded_thresholds(workdir: str | Path, config, num_classes: int) -> list[float] | None:
    """A multi-label run's probability threshold per label: `eval.threshold` when the config (or an override) sets
    one, else those the run fixed when it finished (`summary.json`'s `thresholds`); None for single-label runs."""
    if not plans.multi_label_data(config):
        return None
    if config.eval.threshold is not None:
        return [float(config.eval.threshold)] * num_classes
    path = Path(workdir) / "summary.json"
    if not path.is_file():
        raise MissingFileError(f"{path} not found: a multi-label run fixes its thresholds on val when `train` "
                               f"finishes; finish the run (`train` with --workdir {workdir}) or pass "
                               "eval.threshold=P")
    found = read_json(path, "`report`/`train` rewrites it when the run finishes; or pass eval.threshold=P").get(
        "thresholds")
    if not (isinstance(found, list) and len(found) == num_classes):
        raise ConfigError(f"{path} records no threshold per label ({num_classes}); finish the run again (`train` "
                          f"with --workdir {workdir}) or pass eval.threshold=P")
    return [float(t) for t in found]


def evaluate_checkpoint(workdir: str | Path, overrides: tuple[str, ...] = ()) -> dict:
    """Val/test metrics of the kept model in `workdir` (the best checkpoint), with the run's resolved config
    (`config.json`), optionally overridden (e.g. `train.batch_size=64`, or another `data.path`). The run's config
    was accepted when it ran, so only values are checked (an `auto` run keeps keys its final strategy does not
    read)."""
    workdir = Path(workdir)
    config = apply_overrides(load_resolved(workdir), list(overrides))
    check_values(config)
    restored, meta = _kept(workdir)
    model, prep = plans.kept_model(config, workdir)
    dataset = plans.data_source(config).load()
    if config.data.decoded_cache:
        dataset = decoded_dataset(dataset, prep, cache_dir() / "decoded", config.data.decoded_cache_side)
    if list(dataset.class_names) != meta["classes"]:
        raise ConfigError(f"the data's classes {list(dataset.class_names)} are not those the model was trained on "
                          f"({meta['classes']})")
    state = _restored(restored, model.lora_scale)
    mesh = make_mesh()
    source = ImageSource(dataset, prep, Augment(enabled=False), config.train.batch_size, config.seed)
    eval_step = make_eval_step(model.classifier(dataset.num_classes), dataset.num_classes, mesh, source.inputs,
                               config.eval.tta)
    state = jax.device_put(state, replicated(mesh))
    result = {"best_epoch": meta["best"]["epoch"]}
    thresholds = recorded_thresholds(workdir, config, dataset.num_classes)
    if thresholds is not None:
        result["thresholds"] = thresholds
    for split in ("val", "test"):
        if split in dataset.splits:
            metrics = evaluate_split(eval_step, state, source, split, mesh, config.progress, thresholds)
            result[split] = {k: v for k, v in metrics.items() if k not in ("confusion", "pr_curves", "thresholds")}
    return result


def load_trained(workdir: str | Path) -> tuple[Any, dict, Preprocessing, tuple[str, ...]]:
    """`(model, variables, preprocessing, class_names)` of the kept model in `workdir`, for prediction (a
    multi-label run's thresholds: `recorded_thresholds`)."""
    workdir = Path(workdir)
    config = load_resolved(workdir)
    restored, meta = _kept(workdir)
    classes = tuple(meta["classes"])
    model, prep = plans.kept_model(config, workdir)
    state = _restored(restored, model.lora_scale)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return model.classifier(len(classes)).clone(lora_scale=0.0), variables, prep, classes
