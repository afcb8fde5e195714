"""`lr-find`: fastai's learning-rate finder. From the config's starting state (its weights, strategy and optimizer),
the learning rate grows exponentially over a few hundred steps while the training loss is recorded; the sweep
stops once the loss has blown up. The suggestion is the learning rate where the smoothed loss falls fastest
(fastai's "steep"), with the loss minimum's tenth beside it; `lr_find.png` plots the curve, `lr_find.json` holds
it. Nothing of the run's own files is touched: the workdir only gets those two files."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax

from jaxtl.core.atomic import write_json_atomic
from jaxtl.core.errors import ConfigError
from jaxtl.core.processes import is_main
from jaxtl.core.sharding import make_mesh, prefetch_to_mesh, replicated
from jaxtl.train.inputs import ImageSource
from jaxtl.train.run import check_config, make_plan
from jaxtl.train.steps import create_train_state, make_train_step
from jaxtl.transfer.freeze import Freezing
from jaxtl.transfer.optimizer import optimizer_from_rules

log = logging.getLogger(__name__)

SMOOTHING = 0.98  # fastai's: an exponential moving average of the loss, bias-corrected
BLOW_UP = 4.0  # the sweep stops when the smoothed loss exceeds this many times its minimum


def exponential_schedule(start: float, end: float, steps: int) -> optax.Schedule:
    """`start` at step 0 to `end` at step `steps - 1`, growing by the same factor every step."""
    ratio = math.log(end / start) / max(steps - 1, 1)
    return lambda count: start * jax.numpy.exp(ratio * count)


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> dict:
    """`{"suggested_lr", "min_loss_lr"}`: where the smoothed loss falls fastest against log LR, and the LR at its
    minimum over 10 (the two suggestions fastai prints)."""
    if len(lrs) < 3:
        raise ConfigError("lr-find needs at least 3 steps before the loss blows up; start from a smaller LR")
    slopes = np.gradient(smoothed, np.log(lrs))
    return {"suggested_lr": float(lrs[int(np.argmin(slopes))]),
            "min_loss_lr": float(lrs[int(np.argmin(smoothed))] / 10)}


def lr_find(config: ml_collections.ConfigDict, workdir: str | Path, steps: int = 100, start_lr: float = 1e-7,
            end_lr: float = 10.0) -> dict:
    """The sweep of `config` (its first phase's rules and optimizer) over `steps` steps from `start_lr` to
    `end_lr`; writes `lr_find.png` and `lr_find.json` into `workdir` and returns the latter's content."""
    if steps < 3 or not 0 < start_lr < end_lr:
        raise ConfigError(f"lr-find: --steps {steps} --start-lr {start_lr:g} --end-lr {end_lr:g}: need at least 3 "
                          "steps and 0 < start LR < end LR")
    config = config.copy_and_resolve_references()
    check_config(config)
    workdir = Path(workdir)
    plan = make_plan(config, workdir)
    if not hasattr(plan.settings, "augment"):
        raise ConfigError(f"lr-find sweeps the learning rate of training on images; transfer.strategy="
                          f"{plan.strategy} fits its head on cached features without one (set features.cache=False "
                          "or choose a fine-tuning strategy)")
    mesh = make_mesh()
    fit = plan.settings.fit
    opt = fit.optimizer
    model, variables = plan.model.create(plan.num_classes)
    rules = fit.phases[0].rules
    tx = optimizer_from_rules(variables["params"], rules, exponential_schedule(start_lr, end_lr, steps), opt.name,
                              weight_decay=opt.weight_decay, momentum=opt.momentum, decay_rules=opt.decay_rules)
    source = ImageSource(plan.dataset, plan.prep, plan.settings.augment, plan.batch_size, plan.seed, plan.workers)
    if source.steps_per_epoch() == 0:
        raise ConfigError(f"train.batch_size={plan.batch_size} is larger than the train split")
    step = make_train_step(model, tx, mesh, freezing=Freezing.from_rules(variables, rules, fit.train_frozen_bn),
                           label_smoothing=opt.label_smoothing, inputs=source.inputs)
    state = jax.device_put(create_train_state(variables, tx, plan.seed), replicated(mesh))
    epochs = -(-steps // source.steps_per_epoch())
    lrs, losses, smoothed, average, best = [], [], [], 0.0, math.inf
    stream = prefetch_to_mesh(source.train_batches(0, 0, epochs=epochs), mesh)
    try:
        for i in range(steps):
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))  # the schedule's, in float64 for the record
            state, sums = step(state, next(stream))
            loss = float(sums["loss"] / max(float(sums["count"]), 1.0))
            if not math.isfinite(loss):
                break
            average = SMOOTHING * average + (1 - SMOOTHING) * loss
            value = average / (1 - SMOOTHING ** (i + 1))
            lrs.append(lr), losses.append(loss), smoothed.append(value)
            best = min(best, value)
            if i > 10 and value > BLOW_UP * best:
                break
    finally:
        stream.close()
    result = {"lrs": lrs, "losses": losses, "smoothed": smoothed,
              **suggest(np.asarray(lrs), np.asarray(smoothed))}
    if is_main():
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(workdir / "lr_find.json", result)
        _plot(workdir / "lr_find.png", result, config.optimizer.lr)
    log.info("lr-find: %d steps from %g; suggested optimizer.lr=%.3g (steepest fall), %.3g (minimum / 10); the "
             "config's is %g", len(lrs), start_lr, result["suggested_lr"], result["min_loss_lr"], config.optimizer.lr)
    return result


def _plot(path: Path, result: dict, configured: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxtl.core.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lrs"], result["losses"], alpha=0.3, label="loss")
    ax.plot(result["lrs"], result["smoothed"], label="smoothed")
    ax.axvline(result["suggested_lr"], color="tab:red", linestyle="--",
               label=f"suggested {result['suggested_lr']:.2g}")
    ax.axvline(configured, color="tab:gray", linestyle=":", label=f"config {configured:g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
