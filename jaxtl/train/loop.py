"""`train_and_evaluate(config, workdir)`: the whole run, resumable at any step.

config -> checks -> dataset + model + weights -> phases (rules) -> per-phase optimizer and jitted steps -> epochs
-> checkpoints, metrics and a summary. The same loop trains on images (`ImageSource`) and a head on cached
features (`FeatureSource`); a logistic-regression head on cached features is fitted by L-BFGS instead
(`jaxtl.train.on_features`). Rerunning with the same workdir resumes from the latest finished checkpoint and ends
with the same numbers as an uninterrupted run (batches and dropout depend only on seed, epoch and step). Every
process of a multi-process job runs it; process 0 writes the reports.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxtl.advice.matrix import decide, format_advice
from jaxtl.advice.measure import measure
from jaxtl.advice.trials import adopt, run_trials
from jaxtl.atomic import write_json_atomic
from jaxtl.config import (apply_overrides, base_config, check_config, check_unread, differences, load_resolved,
                          save_resolved, uses_feature_cache, CONFIG_FILE)
from jaxtl.data.decoded import decoded_dataset
from jaxtl.data.folder import ImageDataset
from jaxtl.data.pipeline import Augment
from jaxtl.data.sources import load_dataset, unread_fractions
from jaxtl.distributed import barrier, is_main
from jaxtl.errors import ConfigError, MissingFileError
from jaxtl.sharding import global_batch, make_mesh, replicated, sum_over_batches
from jaxtl.train import build
from jaxtl.train.checkpoints import Checkpoints
from jaxtl.train.preemption import Preempted, PreemptionWatch
from jaxtl.train.inputs import ImageSource
from jaxtl.train.report import MetricsLog, write_report
from jaxtl.train.steps import TrainState, eval_metrics, make_eval_step, make_train_step
from jaxtl.transfer.freeze import frozen_batchnorm_layers, trainable_mask
from jaxtl.transfer.optimizer import carry_over_state, cohort_labels, make_optimizer, make_schedule
from jaxtl.transfer.strategies import Phase
from jaxtl.weights.files import cache_dir

log = logging.getLogger(__name__)


def _phase_at(phases: list[Phase], epoch: int) -> int:
    """The index of the phase a 0-based epoch belongs to."""
    ends = np.cumsum([phase.epochs for phase in phases])
    return int(min(np.searchsorted(ends, epoch, side="right"), len(phases) - 1))


def evaluate(eval_step, state: TrainState, source, split: str, mesh, progress: bool) -> dict:
    """Loss, accuracy, top-5 accuracy, per-class accuracy and confusion matrix over a whole split."""
    stream = tqdm(source.eval_batches(split), total=source.eval_steps(split), desc=split, leave=False,
                  disable=not (progress and is_main()))
    totals = sum_over_batches(lambda batch: eval_step(state.params, state.batch_stats, batch), stream, mesh)
    return eval_metrics(totals)


def _check_before_work(config: ml_collections.ConfigDict) -> None:
    check_config(config)
    build.check_model_config(config)
    unread = unread_fractions(config.data, base_config().data)
    if unread:
        raise ConfigError(f"{', '.join(unread)}: set, but {config.data.path} has that split's own folder, so it is "
                          "never read; remove it")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    config = config.copy_and_resolve_references()
    _check_before_work(config)
    mesh = make_mesh()
    if config.train.batch_size % mesh.size:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be divisible by the number of devices "
                          f"({mesh.size})")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset: ImageDataset = load_dataset(config.data, seed=config.seed)
    log.info("dataset %s: %d classes, %s%s", dataset.source, dataset.num_classes,
             {k: len(v) for k, v in dataset.splits.items()},
             "".join(f"; {k} carved from train ({v:g})" for k, v in (dataset.carved or {}).items()))
    if dataset.skipped:
        log.warning("skipped %d unreadable images (data.skip_bad_images=True)", len(dataset.skipped))
    dataset = _decoded(dataset, config)
    extra = {}
    if config.transfer.strategy == "auto":
        config, advice = follow_advice(config, dataset, workdir, mesh)
        extra["auto"] = {key: advice.get(key) for key in ("size", "similarity", "cell", "chosen", "trials")}
    _save_or_compare_resolved(config, workdir)
    if uses_feature_cache(config):
        from jaxtl.train.on_features import train_on_features

        return train_on_features(config, workdir, dataset, mesh, extra)

    model, variables = build.create(config, dataset.num_classes)
    augment = Augment(crop_scale=tuple(config.data.augment.crop_scale), flip=config.data.augment.flip,
                      enabled=config.data.augment.enabled)
    source = ImageSource(dataset, build.preprocessing(config), augment, config.train.batch_size, config.seed,
                         config.data.workers)
    if source.steps_per_epoch() == 0:
        raise ConfigError(f"train.batch_size={config.train.batch_size} is larger than the train split "
                          f"({len(dataset.splits['train'])} images)")
    return fit(config, workdir, dataset, model, variables, source, mesh, extra)


def _decoded(dataset: ImageDataset, config: ml_collections.ConfigDict) -> ImageDataset:
    """With `data.decoded_cache`, the dataset read from the decoded-image cache ($JAXTL_CACHE_DIR/decoded)."""
    if not config.data.decoded_cache:
        return dataset
    return decoded_dataset(dataset, build.preprocessing(config), cache_dir() / "decoded")


def _save_or_compare_resolved(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Writes `config.json`; a workdir that already has one (a resumed run) must have been started with the same
    config, else its checkpoints belong to another run."""
    if (workdir / CONFIG_FILE).is_file():
        changed = differences(load_resolved(workdir), config)
        if changed:
            raise ConfigError(f"{workdir} holds a run with another config ({'; '.join(changed)}); use a new "
                              "--workdir, or the original config to resume it")
    elif is_main():
        save_resolved(config, workdir)


def fit(config: ml_collections.ConfigDict, workdir: Path, dataset: ImageDataset, model, variables: dict, source,
        mesh, extra_summary: dict | None = None) -> dict:
    """Trains `model` from `variables` on `source`'s batches, step by step, phase by phase; evaluates at every
    epoch's end and keeps the latest and the best (val accuracy) checkpoints; returns the summary it writes.

    Checkpoints are also taken every `train.checkpoint_every_steps` steps and/or `train.checkpoint_every_minutes`,
    with the epoch's running metrics, so a run killed at any step resumes from the last one and ends exactly as an
    uninterrupted run would: the rest of the epoch's batches, its dropout and its metrics depend only on (seed,
    epoch, step). On SIGTERM it saves at the next step boundary and raises `Preempted`.
    """
    main = is_main()
    progress = config.progress and main
    params = variables["params"]
    phases = build.phases(config, model.backbone.groups)
    key = "transfer.rules" if config.transfer.strategy == "custom" else f"transfer.strategy={config.transfer.strategy}"
    multipliers = [build.multipliers(params, phase, key) for phase in phases]
    decay = build.decay_mask(params, config)
    total_epochs = sum(p.epochs for p in phases)
    steps_per_epoch = source.steps_per_epoch()
    total_steps = total_epochs * steps_per_epoch
    opt = config.optimizer
    every_steps, every_minutes = config.train.checkpoint_every_steps, config.train.checkpoint_every_minutes

    def optimizer_for(index: int):
        phase = phases[index]
        labels, cohorts = cohort_labels(multipliers[: index + 1])
        schedule = make_schedule(opt.lr, phase.epochs * steps_per_epoch, int(opt.warmup_epochs * steps_per_epoch))
        done = {label: sum(p.epochs for p in phases[c.since:index]) * steps_per_epoch for label, c in cohorts.items()}
        return make_optimizer(labels, cohorts, schedule, opt.name, opt.weight_decay, opt.momentum, decay, done)

    def train_step_for(index: int, tx):
        trainable = trainable_mask(multipliers[index])
        frozen_bn = frozenset() if config.transfer.train_frozen_bn else frozen_batchnorm_layers(
            trainable, variables.get("batch_stats", {}))
        return make_train_step(model, tx, trainable, frozen_bn, opt.label_smoothing, mesh, source.inputs)

    checkpoints = Checkpoints(workdir)
    history: list[dict] = []
    best = {"val_accuracy": -1.0, "epoch": -1}
    step, totals, epoch_seconds, phase_index = 0, None, 0.0, 0
    tx = optimizer_for(0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                       opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(config.seed)))
    def abstract_state(tx):
        """The state's structure as `tx` makes it, placed on this run's mesh (any device layout restores)."""
        shapes = jax.eval_shape(lambda: state.replace(opt_state=tx.init(state.params)))
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)),
                                      shapes)

    if checkpoints.latest_step() is not None:
        meta = checkpoints.restore_meta(checkpoints.latest)
        step, history, best, epoch_seconds = meta["step"], meta["history"], meta["best"], meta["epoch_seconds"]
        if meta["totals"] is not None:
            totals = {k: jnp.asarray(v, jnp.float32) for k, v in meta["totals"].items()}
        phase_index = _phase_at(phases, min(step // steps_per_epoch, total_epochs - 1))
        tx = optimizer_for(phase_index)
        state = checkpoints.restore_state(checkpoints.latest, abstract_state(tx))
        epoch, batch = divmod(step, steps_per_epoch)
        log.info("resumed from %s at step %d of %d (epoch %d, batch %d of %d)", workdir / "checkpoints", step,
                 total_steps, epoch + 1, batch, steps_per_epoch)

    state = jax.device_put(state, replicated(mesh))
    eval_step = make_eval_step(model, dataset.num_classes, mesh, source.inputs)
    train_step = train_step_for(phase_index, tx)
    metrics_log = MetricsLog(workdir, history, enabled=main)
    meta_base = {"classes": list(dataset.class_names)}

    def meta(totals_now, seconds: float) -> dict:
        host = None if totals_now is None else {k: float(v) for k, v in jax.device_get(totals_now).items()}
        return meta_base | {"step": step, "history": history, "best": best, "totals": host, "epoch_seconds": seconds}

    watch, last_save = PreemptionWatch(), time.monotonic()
    first_epoch = step // steps_per_epoch
    stream = iter(source.train_batches(first_epoch, step % steps_per_epoch, epochs=total_epochs - first_epoch)
                  if step < total_steps else ())
    try:
        while step < total_steps:
            epoch, start = divmod(step, steps_per_epoch)
            new_phase = _phase_at(phases, epoch)
            if new_phase != phase_index:
                phase_index, old_tx_state = new_phase, state.opt_state
                tx = optimizer_for(phase_index)
                state = jax.device_put(state.replace(opt_state=carry_over_state(old_tx_state, tx.init(state.params))),
                                       replicated(mesh))
                train_step = train_step_for(phase_index, tx)
                log.info("phase %d: rules %s", phase_index, phases[phase_index].rules)
            begin = time.perf_counter()
            for _ in tqdm(range(start, steps_per_epoch), initial=start, total=steps_per_epoch,
                          desc=f"epoch {epoch + 1}/{total_epochs}", leave=False, disable=not progress):
                state, sums = train_step(state, global_batch(next(stream), mesh))
                totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
                step += 1
                if step % steps_per_epoch == 0:
                    break  # the epoch's end: evaluated and saved below
                preempted = watch.reached(step)
                if preempted or (every_steps and step % every_steps == 0) or (
                        every_minutes and time.monotonic() - last_save >= 60 * every_minutes):
                    checkpoints.save(checkpoints.latest, step, state,
                                     meta(totals, epoch_seconds + time.perf_counter() - begin), wait=preempted)
                    last_save = time.monotonic()
                if preempted:
                    raise Preempted(_preempted_message(step, total_steps, workdir))
            totals = jax.device_get(totals)  # waits for the epoch's last step: the time is the steps' own
            seconds = epoch_seconds + time.perf_counter() - begin
            record = {"epoch": epoch + 1, "step": step, "phase": phase_index,
                      "train_loss": float(totals["loss"] / totals["count"]),
                      "train_accuracy": float(totals["correct"] / totals["count"]), "seconds": seconds}
            if "val" in source.splits:
                val = evaluate(eval_step, state, source, "val", mesh, progress)
                record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
                if dataset.num_classes > 5:
                    record["val_top5_accuracy"] = val["top5_accuracy"]
            history.append(record)
            metrics_log.write(record)
            log.info("epoch %d/%d: %s", epoch + 1, total_epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float)))
            totals, epoch_seconds = None, 0.0
            if record.get("val_accuracy", -1.0) > best["val_accuracy"]:
                best = {"val_accuracy": record["val_accuracy"], "epoch": epoch + 1}
                checkpoints.save(checkpoints.best, step, state, meta(None, 0.0))
            preempted = watch.reached(step)
            checkpoints.save(checkpoints.latest, step, state, meta(None, 0.0), wait=preempted)
            last_save = time.monotonic()
            if preempted and step < total_steps:
                raise Preempted(_preempted_message(step, total_steps, workdir))
    finally:
        watch.close()

    if best["epoch"] < 0:  # no val split: the final model is the one kept
        checkpoints.save(checkpoints.best, step, state, meta(None, 0.0))
    checkpoints.wait()
    summary = run_summary(config, dataset, mesh) | (extra_summary or {}) | {
        "epochs": total_epochs, "steps": step, "train_seconds": round(sum(h["seconds"] for h in history), 2),
        "best_val_accuracy": best["val_accuracy"] if best["epoch"] > 0 else None, "best_epoch": best["epoch"],
        "final_val_accuracy": history[-1].get("val_accuracy") if history else None,
    }
    if "val" in source.splits:
        summary["final_val"] = evaluate(eval_step, state, source, "val", mesh, progress)
    if "test" in source.splits:
        # The test split judges the model the run keeps: the best checkpoint by val accuracy.
        kept = checkpoints.restore_state(checkpoints.best, abstract_state(tx)) if best["epoch"] > 0 else state
        summary["best_checkpoint_test"] = evaluate(eval_step, kept, source, "test", mesh, progress)
        summary["test_accuracy"] = summary["best_checkpoint_test"]["accuracy"]
    if main:
        write_report(workdir, summary, history, dataset.class_names)
    metrics_log.close()
    checkpoints.close()
    return summary


def _preempted_message(step: int, total: int, workdir: Path) -> str:
    return (f"preempted (SIGTERM) after step {step} of {total}: saved {workdir / 'checkpoints'}; run the same "
            "command again to resume from there")


def _restored(restored: dict) -> TrainState:
    """A TrainState for evaluation from a checkpoint restored as plain arrays (no optimizer state needed)."""
    restored = jax.tree_util.tree_map(np.asarray, restored)
    return TrainState(step=restored["step"], params=restored["params"], batch_stats=restored.get("batch_stats", {}),
                      opt_state=None, rng=restored["rng"])


def run_summary(config: ml_collections.ConfigDict, dataset: ImageDataset, mesh) -> dict:
    """The summary fields every run has: what was trained on what, where."""
    return {"model": config.model.name, "weights": build.weights(config), "strategy": config.transfer.strategy,
            "head_layers": list(config.head.layers), "classes": list(dataset.class_names),
            "input_size": build.preprocessing(config).input_size, "devices": mesh.size,
            "splits": {k: len(v) for k, v in dataset.splits.items()}}


def follow_advice(config: ml_collections.ConfigDict, dataset: ImageDataset, workdir: Path, mesh
                  ) -> tuple[ml_collections.ConfigDict, dict]:
    """`transfer.strategy=auto`: measures the data (`jaxtl.advice`), places it in the matrix, tries the cell's
    candidates within `transfer.auto_budget_minutes` (`jaxtl.advice.trials`), writes `advice.json` to the workdir,
    logs the advice and returns the config with the winner's overrides applied, and the advice. A resumed run reads
    its `advice.json` back instead of measuring again."""
    path = workdir / "advice.json"
    if path.is_file():
        advice = json.loads(path.read_text())
        log.info("transfer.strategy=auto: following the advice in %s: %s", path, " ".join(advice["overrides"]))
    else:
        start = time.perf_counter()
        measured = measure(dataset, config.model.name, config.model.weights, build.preprocessing(config),
                           backbone_kwargs=build.backbone_kwargs(config), dtype=build.compute_dtype(config),
                           seed=config.seed, cache_dir=config.features.cache_dir or None,
                           batch_size=config.train.batch_size, progress=config.progress and is_main(),
                           l2_grid=tuple(config.probe.l2_grid) or None)
        advice = decide(measured, epochs=config.train.epochs)
        if config.transfer.auto_budget_minutes > 0:
            trials = run_trials(config, dataset, advice, mesh, workdir, config.transfer.auto_budget_minutes,
                                spent_seconds=time.perf_counter() - start, keep_winner=True)
            run_dir = trials.pop("run_dir")
            if run_dir:
                _continue_from_trial(Path(run_dir), workdir, trials["winner"])
            advice = adopt(advice, trials)
        if is_main():
            write_json_atomic(path, advice)
        for line in format_advice(advice, dataset.source).splitlines():
            log.info("advice: %s", line)
        log.info("transfer.strategy=auto follows the advice: %s", " ".join(advice["overrides"]))
    config = apply_overrides(config.copy_and_resolve_references(), advice["overrides"])
    check_unread(config, warn_only=True)  # the user could not know which path auto would choose
    build.check_model_config(config)
    return config, advice


def _continue_from_trial(trial_dir: Path, workdir: Path, name: str) -> None:
    """The winning trial trained this very run (every training image, the run's epochs and config): its checkpoints
    and TensorBoard events become the run's, which then finds itself finished and only evaluates and reports."""
    if is_main():
        for part in ("checkpoints", "best", "tensorboard"):
            if (trial_dir / part).exists() and not (workdir / part).exists():
                shutil.move(str(trial_dir / part), str(workdir / part))
        shutil.rmtree(trial_dir, ignore_errors=True)
    barrier("auto: trial kept")
    log.info("auto: the trial of %s was this run (every training image, the run's epochs): its checkpoints are "
             "kept, not trained again", name)


def evaluate_checkpoint(workdir: str | Path, overrides: tuple[str, ...] = ()) -> dict:
    """Val/test metrics of the best checkpoint in `workdir` (the model the run kept), with the run's resolved
    config (`config.json`), optionally overridden (e.g. `train.batch_size=64`, or another `data.path`)."""
    workdir = Path(workdir)
    config = apply_overrides(load_resolved(workdir), list(overrides))
    check_config(config)
    checkpoints = Checkpoints(workdir)
    if checkpoints.latest_step(checkpoints.best) is None:
        raise MissingFileError(f"no best checkpoint in {workdir / 'best'}; run `train` with this workdir first")
    dataset = _decoded(load_dataset(config.data, seed=config.seed), config)
    meta = checkpoints.restore_meta(checkpoints.best)
    if list(dataset.class_names) != meta["classes"]:
        raise ConfigError(f"the data's classes {list(dataset.class_names)} are not those the model was trained on "
                          f"({meta['classes']})")
    model = build.classifier(config, dataset.num_classes)
    state = _restored(checkpoints.restore_state(checkpoints.best))
    checkpoints.close()
    mesh = make_mesh()
    source = ImageSource(dataset, build.preprocessing(config), Augment(enabled=False), config.train.batch_size,
                         config.seed)
    eval_step = make_eval_step(model, dataset.num_classes, mesh, source.inputs)
    state = jax.device_put(state, replicated(mesh))
    result = {"best_epoch": meta["best"]["epoch"]}
    for split in ("val", "test"):
        if split in dataset.splits:
            metrics = evaluate(eval_step, state, source, split, mesh, config.progress)
            result[split] = {k: v for k, v in metrics.items() if k != "confusion"}
    return result


def load_trained(workdir: str | Path) -> tuple[Any, dict, Any, tuple[str, ...]]:
    """`(model, variables, preprocessing, class_names)` of the best checkpoint in `workdir`, for prediction."""
    workdir = Path(workdir)
    config = load_resolved(workdir)
    checkpoints = Checkpoints(workdir)
    if checkpoints.latest_step(checkpoints.best) is None:
        raise MissingFileError(f"no checkpoint in {workdir / 'best'} yet; run (or resume) `train` with --workdir "
                               f"{workdir}")
    classes = tuple(checkpoints.restore_meta(checkpoints.best)["classes"])
    restored = checkpoints.restore_state(checkpoints.best)
    checkpoints.close()
    model = build.classifier(config, len(classes))
    variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
    return model, variables, build.preprocessing(config), classes
