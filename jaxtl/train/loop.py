"""`fit`: the epoch loop that trains a model on a source's batches (images, or cached features for an MLP head),
step by step, phase by phase, resumable at any step.

Rerunning with the same workdir resumes from the latest good checkpoint and ends with the same numbers as an
uninterrupted run (batches and dropout depend only on seed, epoch and step). Every process of a multi-process job
runs it; process 0 writes the logs.

A non-finite loss stops the run within a few steps with `DivergedError`; no checkpoint of a non-finite state is
ever written (the save checks every array), so the checkpoints hold the last finite state. With
`train.skip_nonfinite`, steps with a non-finite loss or gradient change nothing and are counted instead.
"""

from __future__ import annotations

import collections
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from jaxtl.core.errors import DivergedError
from jaxtl.core.processes import is_main
from jaxtl.core.sharding import add_trees, prefetch_to_mesh, replicated
from jaxtl.models.lora import has_lora
from jaxtl.rules import match_rules
from jaxtl.train.cadence import TimedSaves
from jaxtl.train.checkpoints import Checkpoints, NonFiniteState
from jaxtl.train.evaluate import evaluate_split
from jaxtl.train.finish import Trained
from jaxtl.train.plan import FitSettings, Plan, strategy_key
from jaxtl.train.preemption import Paused, Preempted, PreemptionWatch
from jaxtl.train.report import MetricsLog
from jaxtl.train.steps import TrainState, create_train_state, keep_form, make_eval_step, make_train_step
from jaxtl.transfer.freeze import Freezing, trainable_mask
from jaxtl.transfer.optimizer import carry_over_state, cohort_labels, make_optimizer
from jaxtl.transfer.recipe import balanced_class_weights, layer_decay_multipliers
from jaxtl.transfer.strategies import Phase

log = logging.getLogger(__name__)


def phase_at(phases: tuple[Phase, ...], epoch: int) -> int:
    """The index of the phase a 0-based epoch belongs to."""
    ends = np.cumsum([phase.epochs for phase in phases])
    return int(min(np.searchsorted(ends, epoch, side="right"), len(phases) - 1))


def patience_spent(history: list[dict], best: dict, patience: int) -> bool:
    """Early stopping: `patience` epochs (0: never) since the best val accuracy, judged from the history and the
    best a checkpoint keeps, so a resumed run stops where an uninterrupted one would."""
    return bool(patience and history and "val_accuracy" in history[-1]
                and history[-1]["epoch"] - best["epoch"] >= patience)


class NonFiniteWatch:
    """Finds the first step whose loss or gradient was not finite, a few steps late so that it never waits for the
    device: it keeps each step's flag and reads those the device has finished."""

    def __init__(self, lag: int = 4):
        self.lag, self.pending = lag, collections.deque()

    def add(self, step: int, flag: jax.Array) -> int | None:
        """Records step `step`'s flag; returns the first non-finite step among those now finished, if any."""
        self.pending.append((step, flag))
        while len(self.pending) > self.lag or (self.pending and self.pending[0][1].is_ready()):
            done, value = self.pending.popleft()
            if float(value):
                return done
        return None

    def first(self, default: int) -> int:
        """The first non-finite step among those not read yet (waiting for them), else `default`."""
        while self.pending:
            done, value = self.pending.popleft()
            if float(value):
                return done
        return default


def diverged_message(plan: Plan, settings: FitSettings, step: int, total: int, steps_per_epoch: int,
                     kept: int | None) -> str:
    opt = settings.optimizer
    bf16 = " or a bfloat16 overflow" if plan.model.dtype == "bfloat16" else ""
    where = f"step {kept}" if kept is not None else "nothing yet: no checkpoint was saved"
    return (f"the training loss or a gradient is not finite (NaN or Inf) at step {step} of {total} (epoch "
            f"{(step - 1) // steps_per_epoch + 1}): the run diverged; the likely cause is a learning rate too high "
            f"for this model and data (optimizer.lr={opt.lr:g}){bf16}. The checkpoints in {plan.workdir} hold the "
            f"last finite state ({where}); lower optimizer.lr and train in a new --workdir, or set "
            "train.skip_nonfinite=True to skip such steps")


@dataclass
class Progress:
    """Where a run stands, as its checkpoints' metadata holds it: the steps done, the finished epochs' records, the
    best val accuracy and its epoch, and the current epoch's seconds and running sums so far (a checkpoint taken
    inside an epoch)."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_accuracy": -1.0, "epoch": -1})
    epoch_seconds: float = 0.0
    totals: dict | None = None

    def meta(self, classes: list[str], totals: dict | None = None, seconds: float = 0.0) -> dict:
        """A checkpoint's metadata now: inside an epoch with its running `totals` and `seconds`, else none."""
        host = None if totals is None else {k: float(v) for k, v in jax.device_get(totals).items()}
        return {"classes": classes, "step": self.step, "history": self.history, "best": self.best, "totals": host,
                "epoch_seconds": seconds}

    @classmethod
    def from_meta(cls, meta: dict) -> Progress:
        totals = meta["totals"]
        return cls(meta["step"], meta["history"], meta["best"], meta["epoch_seconds"],
                   None if totals is None else {k: jnp.asarray(v, jnp.float32) for k, v in totals.items()})


def resume(checkpoints: Checkpoints, abstract_at: Callable[[int], Any]) -> tuple[Any, Progress] | None:
    """The state and progress of the newest usable latest checkpoint (damaged ones skipped, `Checkpoints.restore`),
    the state restored into `abstract_at(step)`, its structure at the checkpoint's step (that phase's optimizer
    state); None when the run has no checkpoint yet."""
    if checkpoints.latest_step() is None:
        return None
    state, meta = checkpoints.restore(checkpoints.latest, lambda meta: abstract_at(meta["step"]))
    return state, Progress.from_meta(meta)


def epoch_record(totals: dict, epoch: int, step: int, phase: int, seconds: float, skip_nonfinite: bool) -> dict:
    """An epoch's line of `metrics.jsonl` (without its val metrics) from the epoch's summed step results."""
    count = max(float(totals["count"]), 1.0)
    record = {"epoch": epoch + 1, "step": step, "phase": phase, "train_loss": float(totals["loss"] / count),
              "train_accuracy": float(totals["correct"] / count), "seconds": seconds}
    if skip_nonfinite:
        record["skipped_steps"] = int(totals["nonfinite"])
    return record


class PhaseSteps:
    """What each phase of a run trains with: its optimizer (the strategy's LR multipliers per phase, layer-wise LR
    decay on top, weight decay by `optimizer.decay_rules`, the schedule over the phase's steps) and its jitted train
    step (freezing, the recipe). `fit` builds every phase's from it; `auto` times the step a trial will run with it,
    so the program it compiles for the timing is the trial's own (the compilation cache then serves the trial)."""

    def __init__(self, plan: Plan, settings: FitSettings, model, variables: dict, source, mesh: Mesh):
        self.plan, self.settings, self.model, self.source, self.mesh = plan, settings, model, source, mesh
        params, opt = variables["params"], settings.optimizer
        self.variables = variables
        multipliers = [jax.tree_util.tree_map(float, match_rules(params, phase.rules, strategy_key(plan.strategy)))
                       for phase in settings.phases]
        if opt.layer_decay < 1:  # layer-wise LR decay on top of the strategy's multipliers (frozen stays frozen)
            decayed = layer_decay_multipliers(params, model.backbone.groups, opt.layer_decay)
            multipliers = [jax.tree_util.tree_map(lambda m, d: m * d, phase, decayed) for phase in multipliers]
        self.multipliers = multipliers
        self.decay = jax.tree_util.tree_map(bool, match_rules(params, opt.decay_rules, "optimizer.decay_rules"))
        self.class_weights = None
        if settings.recipe.class_weights == "balanced":
            self.class_weights = balanced_class_weights(plan.dataset.splits["train"].labels, plan.num_classes)

    def optimizer(self, index: int):
        """Phase `index`'s optimizer: its schedule over its own steps; parameters trained since an earlier phase
        (a cohort) go on along the schedule they started."""
        phases, opt, steps_per_epoch = self.settings.phases, self.settings.optimizer, self.source.steps_per_epoch()
        phase = phases[index]
        labels, cohorts = cohort_labels(self.multipliers[: index + 1])
        schedule = opt.schedule(phase.epochs * steps_per_epoch, steps_per_epoch)
        done = {label: sum(p.epochs for p in phases[c.since:index]) * steps_per_epoch for label, c in cohorts.items()}
        return make_optimizer(labels, cohorts, schedule, opt.name, opt.weight_decay, opt.momentum, self.decay, done)

    def train_step(self, index: int, tx):
        """Phase `index`'s jitted train step with optimizer `tx`."""
        settings, recipe = self.settings, self.settings.recipe
        freezing = Freezing.from_multipliers(self.multipliers[index], self.variables.get("batch_stats"),
                                             settings.train_frozen_bn)
        return make_train_step(self.model, tx, self.mesh, freezing=freezing,
                               label_smoothing=settings.optimizer.label_smoothing, inputs=self.source.inputs,
                               skip_nonfinite=settings.skip_nonfinite, mixing=recipe.mixing,
                               class_weights=self.class_weights, accumulate_steps=recipe.accumulate_steps,
                               ema_decay=recipe.ema_decay, ema_warmup=recipe.ema_warmup,
                               num_classes=self.plan.num_classes)

    def initial_state(self, tx) -> TrainState:
        """Step 0 of phase 0 with `tx`, on the mesh (replicated)."""
        plan, recipe = self.plan, self.settings.recipe
        state = create_train_state(self.variables, tx, plan.seed, ema=recipe.ema_decay > 0)
        return jax.device_put(state, replicated(self.mesh))


def fit(plan: Plan, settings: FitSettings, model, variables: dict, source, mesh: Mesh) -> Trained:
    """Trains `model` from `variables` on `source`'s batches; evaluates at every epoch's end and keeps the latest
    and the best (val accuracy) checkpoints.

    Checkpoints are also taken every `checkpoint_every_steps` steps and/or `checkpoint_every_minutes`, with the
    epoch's running metrics, so a run killed at any step resumes from the last one and ends exactly as an
    uninterrupted run would: the rest of the epoch's batches, its dropout and its metrics depend only on (seed,
    epoch, step). On SIGTERM it saves at the next step boundary and raises `Preempted`. Its units: `PhaseSteps`
    (each phase's optimizer and step), `resume` and `Progress` (checkpoints), and the stop conditions
    (`NonFiniteWatch`, `patience_spent`, `PreemptionWatch`).
    """
    workdir, main = plan.workdir, is_main()
    show = plan.progress and main
    params = variables["params"]
    phases, recipe = settings.phases, settings.recipe
    total_epochs = settings.epochs
    steps_per_epoch = source.steps_per_epoch()
    total_steps = total_epochs * steps_per_epoch
    every_steps, every_minutes = settings.checkpoint_every_steps, settings.checkpoint_every_minutes
    built = PhaseSteps(plan, settings, model, variables, source, mesh)
    multipliers, optimizer_for, train_step_for = built.multipliers, built.optimizer, built.train_step
    if built.class_weights is not None:
        log.info("class weights (balanced): %s", ", ".join(f"{w:.3g}" for w in built.class_weights))

    def phase_of(step: int) -> int:
        return phase_at(phases, min(step // steps_per_epoch, total_epochs - 1))

    lora_scale = plan.model.lora_scale
    # The best checkpoint holds the model alone, LoRA factors merged (`keep_form`); merging runs on the mesh.
    keep = jax.jit(lambda st: keep_form(st, lora_scale), out_shardings=replicated(mesh)) if (
        has_lora(variables["params"])) else keep_form
    checkpoints = Checkpoints(workdir)
    run = Progress()
    phase_index = 0
    tx = optimizer_for(0)
    state = create_train_state(variables, tx, plan.seed, ema=recipe.ema_decay > 0)

    def abstract_state(tx, kept: bool = False):
        """The state's structure as `tx` makes it (`kept`: as the best checkpoint holds it), placed on this run's
        mesh (any device layout restores)."""
        shapes = jax.eval_shape(lambda: state.replace(opt_state=tx.init(state.params)))
        if kept:
            shapes = jax.eval_shape(keep, shapes)
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)),
                                      shapes)

    def saved_phase(step: int) -> int:
        """The phase whose optimizer state a checkpoint at `step` holds: the one that trained its last step (at a
        phase's end, the next phase's state is made when its first step comes, from the carried-over state)."""
        return phase_of(max(step - 1, 0))

    resumed = resume(checkpoints, lambda step: abstract_state(optimizer_for(saved_phase(step))))
    if resumed is not None:
        state, run = resumed
        phase_index = saved_phase(run.step)
        tx = optimizer_for(phase_index)
        epoch, batch = divmod(run.step, steps_per_epoch)
        log.info("resumed from %s at step %d of %d (epoch %d, batch %d of %d)", checkpoints.latest.directory,
                 run.step, total_steps, epoch + 1, batch, steps_per_epoch)

    state = jax.device_put(state, replicated(mesh))
    eval_step = make_eval_step(model, plan.num_classes, mesh, source.inputs, recipe.tta)
    train_step = train_step_for(phase_index, tx)
    metrics_log = MetricsLog(workdir, run.history, enabled=main)
    classes = list(plan.dataset.class_names)
    watch, timed, nonfinite = PreemptionWatch(), TimedSaves(every_minutes, run.step), NonFiniteWatch()

    def diverged(bad_step: int) -> DivergedError:
        checkpoints.wait()
        return DivergedError(diverged_message(plan, settings, bad_step, total_steps, steps_per_epoch,
                                              checkpoints.latest_step()))
    patience = recipe.early_stopping_patience
    stopped_early = patience_spent(run.history, run.best, patience)
    first_epoch = run.step // steps_per_epoch
    # the next batches go on the mesh while the current step runs (a background thread)
    stream = prefetch_to_mesh(source.train_batches(first_epoch, run.step % steps_per_epoch,
                                                   epochs=total_epochs - first_epoch)
                              if run.step < total_steps and not stopped_early else (), mesh)
    try:
        while run.step < total_steps and not stopped_early:
            epoch, start = divmod(run.step, steps_per_epoch)
            if phase_of(run.step) != phase_index:
                phase_index, old_tx_state = phase_of(run.step), state.opt_state
                tx = optimizer_for(phase_index)
                state = jax.device_put(state.replace(opt_state=carry_over_state(old_tx_state, tx.init(state.params))),
                                       replicated(mesh))
                train_step = train_step_for(phase_index, tx)
                log.info("phase %d: rules %s", phase_index, phases[phase_index].rules)
            begin = time.perf_counter()
            for _ in tqdm(range(start, steps_per_epoch), initial=start, total=steps_per_epoch,
                          desc=f"epoch {epoch + 1}/{total_epochs}", leave=False, disable=not show):
                state, sums = train_step(state, next(stream))
                run.totals = sums if run.totals is None else add_trees(run.totals, sums)
                run.step += 1
                checkpoints.check()  # a background write that failed (a full disk) stops the run now
                bad = None if settings.skip_nonfinite else nonfinite.add(run.step, sums["nonfinite"])
                if bad is not None:
                    raise diverged(bad)
                if run.step % steps_per_epoch == 0:
                    break  # the epoch's end: evaluated and saved below
                preempted = watch.reached(run.step)
                if (due := timed.due(run.step)) or preempted or (every_steps and run.step % every_steps == 0):
                    if due:
                        log.info("checkpoint at step %d (every %g minutes)", run.step, every_minutes)
                    checkpoints.save(checkpoints.latest, run.step, state,
                                     run.meta(classes, run.totals, run.epoch_seconds + time.perf_counter() - begin),
                                     wait=preempted)
                    timed.saved()
                if preempted:
                    raise Preempted(preempted_message(run.step, total_steps, checkpoints.root, watch.signum),
                                    watch.signum)
            totals = jax.device_get(run.totals)  # waits for the epoch's last step: the time is the steps' own
            seconds = run.epoch_seconds + time.perf_counter() - begin
            skipped = int(totals["nonfinite"])
            if skipped and not settings.skip_nonfinite:  # the last steps' flags, not yet read
                raise diverged(nonfinite.first(run.step))
            if skipped == steps_per_epoch:
                raise DivergedError(f"every step of epoch {epoch + 1} had a non-finite loss or gradient and was "
                                    f"skipped (train.skip_nonfinite): the run cannot learn; lower optimizer.lr="
                                    f"{settings.optimizer.lr:g} and train in a new --workdir")
            record = epoch_record(totals, epoch, run.step, phase_index, seconds, settings.skip_nonfinite)
            if skipped and settings.skip_nonfinite:
                log.warning("epoch %d: %d step(s) with a non-finite loss or gradient skipped", epoch + 1, skipped)
            if "val" in source.splits:  # the run's model: the EMA weights when it keeps them, else the weights
                val = evaluate_split(eval_step, state.kept, source, "val", mesh, show)
                record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
                if "map" in val:  # multi-label
                    record["val_map"] = val["map"]
                if "top5_accuracy" in val:
                    record["val_top5_accuracy"] = val["top5_accuracy"]
                if recipe.ema_decay:  # the raw weights' beside them
                    raw = evaluate_split(eval_step, state, source, "val", mesh, show)
                    record.update(raw_val_loss=raw["loss"], raw_val_accuracy=raw["accuracy"])
                    if "map" in raw:
                        record["raw_val_map"] = raw["map"]
            run.history.append(record)
            metrics_log.write(record)
            log.info("epoch %d/%d: %s", epoch + 1, total_epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float)))
            run.totals, run.epoch_seconds = None, 0.0
            if record.get(plan.score, -1.0) > run.best.get(plan.score, -1.0):
                run.best = {plan.score: record[plan.score], "epoch": epoch + 1}
                checkpoints.save(checkpoints.best, run.step, keep(state), run.meta(classes))
            preempted = watch.reached(run.step)
            paused = plan.pause_after_epochs and epoch + 1 >= plan.pause_after_epochs
            checkpoints.save(checkpoints.latest, run.step, state, run.meta(classes), wait=preempted or paused)
            timed.saved()
            if patience_spent(run.history, run.best, patience) and run.step < total_steps:
                stopped_early = True
                log.info("early stopping after epoch %d: no better %s for %d epochs (best %.4f at epoch %d, kept)",
                         epoch + 1, plan.score, patience, run.best[plan.score], run.best["epoch"])
            if preempted and run.step < total_steps and not stopped_early:
                raise Preempted(preempted_message(run.step, total_steps, checkpoints.root, watch.signum),
                                watch.signum)
            if paused and not stopped_early:  # the last epoch too: trained and saved, not yet finished
                checkpoints.wait()
                raise Paused(epoch + 1)
        if run.best["epoch"] < 0:  # no val split: the final model is the one kept
            checkpoints.save(checkpoints.best, run.step, keep(state), run.meta(classes))
        checkpoints.wait()
    except NonFiniteState as e:  # a save found NaN or Inf in the state: nothing of it was written
        error = diverged(nonfinite.first(run.step))
        checkpoints.abandon()
        raise error from e
    except BaseException:  # a pause (`Paused`) too: the run goes on in another call, with writers of its own
        checkpoints.abandon()
        metrics_log.close()
        raise
    finally:
        watch.close()
        stream.close()
    metrics_log.close()
    final_tx = tx

    def kept() -> TrainState:
        if run.best["epoch"] <= 0:
            return keep(state)
        restored = Checkpoints(workdir, read_only=True)
        try:
            return restored.restore_kept(abstract_state(final_tx, kept=True), (abstract_state(final_tx), keep))[0]
        finally:
            restored.close()

    checkpoints.close()
    trains = jax.tree_util.tree_map(lambda *t: any(t), *(trainable_mask(phase) for phase in multipliers))
    history = run.history
    summary = {"epochs": len(history) if stopped_early else total_epochs, "steps": run.step,
               "train_seconds": round(sum(h["seconds"] for h in history), 2),
               "trainable_params": int(sum(p.size for p, t in zip(jax.tree_util.tree_leaves(params),
                                                                  jax.tree_util.tree_leaves(trains)) if t))}
    if stopped_early:
        summary["stopped_early"] = True
    if settings.skip_nonfinite:
        summary["skipped_steps"] = sum(h.get("skipped_steps", 0) for h in history)
    return Trained(state, kept, history, run.best,
                   lambda s, split, thresholds=None: evaluate_split(eval_step, s.kept, source, split, mesh, show,
                                                                    thresholds),
                   tuple(source.splits), summary)


def preempted_message(step: int, total: int, root: Path, signum: int = signal.SIGTERM) -> str:
    why = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "preempted (SIGTERM)"
    return (f"{why} after step {step} of {total}: saved {root / 'checkpoints'}; run the same command again to "
            "resume from there")
