"""`train_and_evaluate(config, workdir)`: the whole run, resumable at epoch boundaries.

config -> dataset + model + weights -> phases -> per-phase optimizer and jitted steps -> epochs -> checkpoints,
metrics and a summary. Rerunning with the same workdir resumes from the latest finished checkpoint and ends
with the same numbers as an uninterrupted run (batches and dropout depend only on seed, epoch and step).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxtl.advice.matrix import decide, format_advice
from jaxtl.advice.measure import measure
from jaxtl.atomic import write_json_atomic
from jaxtl.config import apply_overrides
from jaxtl.create import create_model, get_preprocessing
from jaxtl.data.folder import ImageDataset, Split
from jaxtl.data.pipeline import Augment, batches, num_batches
from jaxtl.data.sources import load_dataset
from jaxtl.models.registry import get_model_spec
from jaxtl.sharding import global_batch, make_mesh
from jaxtl.train.build import compute_dtype, model_kwargs, plain_kwargs, preprocessing
from jaxtl.train.checkpoints import Checkpoints
from jaxtl.train.on_features import fit_head_on_features, uses_feature_cache
from jaxtl.train.report import MetricsLog, plot_confusion, plot_curves
from jaxtl.train.steps import TrainState, eval_metrics, make_eval_step, make_train_step
from jaxtl.transfer.optimizer import carry_over_state, make_optimizer, make_schedule
from jaxtl.transfer.strategies import STRATEGIES, Phase, make_phases

log = logging.getLogger(__name__)


def _phases(config: ml_collections.ConfigDict) -> list[Phase]:
    t = config.transfer
    return make_phases(t.strategy, config.train.epochs, t.num_stages, t.lr_ratio, tuple(t.phase_epochs))


def _phase_at(phases: list[Phase], epoch: int) -> int:
    """The index of the phase a 0-based epoch belongs to."""
    ends = np.cumsum([phase.epochs for phase in phases])
    return int(min(np.searchsorted(ends, epoch, side="right"), len(phases) - 1))


def evaluate(eval_step, state: TrainState, split: Split, prep, config, mesh, desc: str) -> dict:
    """Loss, accuracy, top-5 accuracy, per-class accuracy and confusion matrix over a whole split."""
    totals = None
    for batch in tqdm(batches(split, prep, config.train.batch_size, train=False,
                              process_index=jax.process_index(), process_count=jax.process_count()),
                      total=num_batches(split, config.train.batch_size, False), desc=desc, leave=False,
                      disable=not config.progress):
        sums = jax.device_get(eval_step(state.params, state.batch_stats, global_batch(batch, mesh)))
        totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    return eval_metrics(totals)


def _restored_train_state(restored: dict) -> TrainState:
    """A TrainState for evaluation from a checkpoint restored as plain arrays (no optimizer state needed)."""
    return TrainState(step=restored["step"], params=restored["params"], batch_stats=restored["batch_stats"],
                      opt_state=None, rng=restored["rng"])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    if config.transfer.strategy not in (*STRATEGIES, "auto"):
        raise ValueError(f"unknown transfer.strategy '{config.transfer.strategy}'; choose from "
                         f"{', '.join(STRATEGIES)} or auto")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    dataset: ImageDataset = load_dataset(config.data, seed=config.seed)
    log.info("dataset %s: %d classes, %s", dataset.source, dataset.num_classes,
             {k: len(v) for k, v in dataset.splits.items()})
    if dataset.skipped:
        log.warning("skipped %d unreadable images (data.skip_bad_images=True)", len(dataset.skipped))
    if config.transfer.strategy == "auto":
        config = follow_advice(config, dataset, workdir)
    if uses_feature_cache(config):
        return _train_on_features(config, workdir, dataset)

    weights = None if config.transfer.strategy == "scratch" else config.model.weights
    model, variables = create_model(config.model.name, weights, num_classes=dataset.num_classes,
                                    rng=config.seed, dtype=compute_dtype(config), **model_kwargs(config))
    prep = preprocessing(config)
    augment = Augment(crop_scale=tuple(config.data.augment.crop_scale), flip=config.data.augment.flip,
                      enabled=config.data.augment.enabled)

    phases = _phases(config)
    total_epochs = sum(p.epochs for p in phases)
    train_split = dataset.splits["train"]
    bs = config.train.batch_size
    steps_per_epoch = num_batches(train_split, bs, True)
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size {bs} is larger than the train split ({len(train_split)} images)")
    mesh = make_mesh()
    if bs % mesh.size:
        raise ValueError(f"train.batch_size {bs} must be divisible by the number of devices ({mesh.size})")
    opt = config.optimizer

    def optimizer_for(phase_index: int):
        phase = phases[phase_index]
        schedule = make_schedule(opt.lr, phase.epochs * steps_per_epoch, int(opt.warmup_epochs * steps_per_epoch))
        done = {g: sum(p.epochs for p in phases[:phase_index] if g in p.trainable) * steps_per_epoch
                for g in phase.trainable}
        return make_optimizer(variables["params"], phase, schedule, opt.name, opt.weight_decay, opt.momentum, done)

    def frozen_bn(phase: Phase) -> tuple[str, ...]:
        return () if config.transfer.train_frozen_bn else phase.frozen

    checkpoints = Checkpoints(workdir)
    history: list[dict] = []
    best = {"val_accuracy": -1.0, "epoch": -1}
    start_epoch, phase_index = 0, 0
    tx = optimizer_for(0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]),
                       rng=jax.random.key_data(jax.random.key(config.seed)))
    latest = checkpoints.latest_epoch()
    if latest is not None:
        meta = checkpoints.restore_meta(checkpoints.latest)
        start_epoch, history, best = meta["epoch"] + 1, meta["history"], meta["best"]
        phase_index = _phase_at(phases, meta["epoch"])
        tx = optimizer_for(phase_index)
        abstract = jax.eval_shape(lambda: state.replace(opt_state=tx.init(state.params)))
        state = checkpoints.restore_state(checkpoints.latest, abstract)
        log.info("resumed from %s at epoch %d", workdir / "checkpoints", start_epoch)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put(state, replicated)
    eval_step = make_eval_step(model, dataset.num_classes, mesh)
    train_step = make_train_step(model, tx, phases[phase_index].frozen, frozen_bn(phases[phase_index]),
                                 opt.label_smoothing, mesh)
    metrics_log = MetricsLog(workdir, history, enabled=is_main)
    train_seconds = sum(h["seconds"] for h in history)

    for epoch in range(start_epoch, total_epochs):
        new_phase = _phase_at(phases, epoch)
        if new_phase != phase_index:
            phase_index, old_tx_state = new_phase, state.opt_state
            tx = optimizer_for(phase_index)
            state = state.replace(opt_state=carry_over_state(old_tx_state, tx.init(state.params)))
            state = jax.device_put(state, replicated)
            train_step = make_train_step(model, tx, phases[phase_index].frozen, frozen_bn(phases[phase_index]),
                                         opt.label_smoothing, mesh)
            log.info("phase %d: training %s", phase_index, ", ".join(phases[phase_index].trainable))
        start = time.perf_counter()
        totals = None
        for batch in tqdm(batches(train_split, prep, bs, train=True, seed=config.seed, epoch=epoch, augment=augment,
                                  process_index=jax.process_index(), process_count=jax.process_count()),
                          total=steps_per_epoch, desc=f"epoch {epoch + 1}/{total_epochs}", leave=False,
                          disable=not config.progress):
            state, sums = train_step(state, global_batch(batch, mesh))
            totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        record = {"epoch": epoch + 1, "step": int(state.step), "phase": phase_index,
                  "train_loss": float(totals["loss"] / totals["count"]),
                  "train_accuracy": float(totals["correct"] / totals["count"]), "seconds": seconds}
        if "val" in dataset.splits:
            val = evaluate(eval_step, state, dataset.splits["val"], prep, config, mesh, "val")
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            if dataset.num_classes > 5:
                record["val_top5_accuracy"] = val["top5_accuracy"]
        history.append(record)
        metrics_log.write(record)
        log.info("epoch %d/%d: %s", epoch + 1, total_epochs,
                 ", ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float)))
        meta = {"epoch": epoch, "history": history, "best": best}
        if record.get("val_accuracy", -1.0) > best["val_accuracy"]:
            best = {"val_accuracy": record["val_accuracy"], "epoch": epoch + 1}
            meta["best"] = best
            checkpoints.save(checkpoints.best, epoch, state, meta)
        checkpoints.save(checkpoints.latest, epoch, state, meta)

    summary = _summary(config, weights, dataset, prep, mesh) | {
        "epochs": total_epochs, "steps": int(state.step), "train_seconds": round(train_seconds, 2),
        "best_val_accuracy": best["val_accuracy"] if best["epoch"] > 0 else None, "best_epoch": best["epoch"],
        "final_val_accuracy": history[-1].get("val_accuracy") if history else None,
    }
    if "val" in dataset.splits:
        summary["final_val"] = evaluate(eval_step, state, dataset.splits["val"], prep, config, mesh, "val")
    if "test" in dataset.splits:
        # The test split judges the model the run keeps: the best checkpoint by val accuracy.
        kept = _restored_train_state(checkpoints.restore_state(checkpoints.best)) if best["epoch"] > 0 else state
        summary["best_checkpoint_test"] = evaluate(eval_step, kept, dataset.splits["test"], prep, config, mesh, "test")
        summary["test_accuracy"] = summary["best_checkpoint_test"]["accuracy"]
    if is_main:
        _write_report(workdir, summary, history, dataset)
    metrics_log.close()
    checkpoints.close()
    return summary


def follow_advice(config: ml_collections.ConfigDict, dataset: ImageDataset, workdir: Path) -> ml_collections.ConfigDict:
    """`transfer.strategy=auto`: measures the data (`jaxtl.advice`), writes `advice.json` to the workdir, logs the
    advice and returns the config with its overrides applied."""
    measured = measure(dataset, config.model.name, config.model.weights, preprocessing(config),
                       model_kwargs=dict(config.model.kwargs), dtype=compute_dtype(config), seed=config.seed,
                       cache_dir=config.features.cache_dir or None, batch_size=config.train.batch_size,
                       progress=config.progress)
    advice = decide(measured)
    if jax.process_index() == 0:
        write_json_atomic(workdir / "advice.json", advice)
    for line in format_advice(advice, dataset.source).splitlines():
        log.info("advice: %s", line)
    log.info("transfer.strategy=auto follows the advice: %s", " ".join(advice["overrides"]))
    return apply_overrides(config.copy_and_resolve_references(), advice["overrides"])


def _advised(config: ml_collections.ConfigDict, workdir: Path) -> ml_collections.ConfigDict:
    """The config an `auto` run in `workdir` trained with (its `advice.json` applied)."""
    if config.transfer.strategy != "auto":
        return config
    path = workdir / "advice.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: transfer.strategy=auto writes it when `train` starts")
    return apply_overrides(config.copy_and_resolve_references(), json.loads(path.read_text())["overrides"])


def _summary(config: ml_collections.ConfigDict, weights, dataset: ImageDataset, prep, mesh) -> dict:
    """The summary fields every run has: what was trained on what, and what `load_trained` rebuilds it from."""
    return {"model": config.model.name, "weights": weights, "strategy": config.transfer.strategy,
            "classes": list(dataset.class_names), "input_size": prep.input_size,
            "model_kwargs": model_kwargs(config), "devices": mesh.size}


def _write_report(workdir: Path, summary: dict, history: list[dict], dataset: ImageDataset) -> None:
    write_json_atomic(workdir / "summary.json", summary)
    if history and "epoch" in history[0]:
        plot_curves(history, workdir / "learning_curves.png")
    elif history and "l2" in history[0]:
        plot_curves(history, workdir / "l2_search.png", x="l2")
    key, title = ("best_checkpoint_test", "test, best checkpoint") if "test" in dataset.splits else (
        "final_val", "val, final model")
    if key in summary:
        plot_confusion(np.asarray(summary[key]["confusion"]), dataset.class_names,
                       workdir / "confusion_matrix.png", f"confusion matrix ({title})")


def _train_on_features(config: ml_collections.ConfigDict, workdir: Path, dataset: ImageDataset) -> dict:
    """`train_and_evaluate` for a linear probe on cached features (`train.on_features`); it does not resume,
    it redoes the fit, which on a warm cache takes seconds."""
    mesh = make_mesh()
    metrics_log = MetricsLog(workdir, [], enabled=jax.process_index() == 0)
    result = fit_head_on_features(config, dataset, mesh, metrics_log)
    fit, state = result["fit"], result["state"]
    best = {"val_accuracy": fit.chosen.get("val_accuracy", -1.0), "epoch": fit.chosen.get("epoch", 1)}
    checkpoints = Checkpoints(workdir)
    meta = {"epoch": best["epoch"] - 1, "history": fit.history, "best": best}
    for manager in (checkpoints.latest, checkpoints.best):
        checkpoints.save(manager, best["epoch"] - 1, state, meta)
    summary = _summary(config, config.model.weights, dataset, preprocessing(config), mesh) | result["summary"] | {
        "epochs": len(fit.history) if config.head.hidden else 0, "steps": int(state.step),
        "best_val_accuracy": fit.chosen.get("val_accuracy"), "best_epoch": best["epoch"],
        "final_val_accuracy": result["evaluations"].get("val", {}).get("accuracy"),
    }
    if "val" in result["evaluations"]:
        summary["final_val"] = result["evaluations"]["val"]
    if "test" in result["evaluations"]:
        summary["best_checkpoint_test"] = result["evaluations"]["test"]
        summary["test_accuracy"] = summary["best_checkpoint_test"]["accuracy"]
    if jax.process_index() == 0:
        _write_report(workdir, summary, fit.history, dataset)
    metrics_log.close()
    checkpoints.close()
    return summary


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Val/test metrics of the best checkpoint in `workdir` (the model the run kept)."""
    workdir = Path(workdir)
    config = _advised(config, workdir)
    checkpoints = Checkpoints(workdir)
    if checkpoints.latest_epoch(checkpoints.best) is None:
        raise FileNotFoundError(f"no best checkpoint in {workdir / 'best'}; run `train` with this workdir first")
    dataset = load_dataset(config.data, seed=config.seed)
    model = get_model_spec(config.model.name).build(num_classes=dataset.num_classes, dtype=compute_dtype(config),
                                                    **model_kwargs(config))
    prep = preprocessing(config)
    meta = checkpoints.restore_meta(checkpoints.best)
    state = _restored_train_state(checkpoints.restore_state(checkpoints.best))
    mesh = make_mesh()
    eval_step = make_eval_step(model, dataset.num_classes, mesh)
    result = {"best_epoch": meta["best"]["epoch"]}
    for split in ("val", "test"):
        if split in dataset.splits:
            metrics = evaluate(eval_step, state, dataset.splits[split], prep, config, mesh, split)
            result[split] = {k: v for k, v in metrics.items() if k != "confusion"}
    checkpoints.close()
    return result


def load_trained(workdir: str | Path):
    """`(model, variables, preprocessing, class_names)` of a finished run's best checkpoint, for prediction."""
    workdir = Path(workdir)
    summary_path = workdir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found: the run in {workdir} has not finished; rerun `train` "
                                "with this workdir to resume it")
    summary = json.loads(summary_path.read_text())
    model = get_model_spec(summary["model"]).build(num_classes=len(summary["classes"]),
                                                   **plain_kwargs(summary["model_kwargs"]))
    checkpoints = Checkpoints(workdir)
    restored = checkpoints.restore_state(checkpoints.best)
    checkpoints.close()
    prep = get_preprocessing(summary["model"], summary["weights"]).with_input_size(summary["input_size"])
    variables = {"params": restored["params"], "batch_stats": restored["batch_stats"]}
    return model, variables, prep, tuple(summary["classes"])
