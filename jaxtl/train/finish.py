"""The end of every run, whatever trained it: the final model evaluated on val, the kept model (the best
checkpoint by val accuracy) judged on test, and the summary and report written (process 0)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import jax
from jax.sharding import Mesh

from jaxtl.core.processes import is_main
from jaxtl.train.plan import Plan
from jaxtl.train.report import write_report
from jaxtl.train.steps import TrainState


@dataclass
class Trained:
    """What a trainer hands to `finish`.

    state: the final state. kept: returns the state the run keeps (the best checkpoint). history: one record per
    epoch (or per L2 strength of a logistic fit). best: `{"val_accuracy", "epoch"}` (epoch -1: no val split).
    evaluate(state, split): that split's metrics, on the trainer's own inputs (images or cached features).
    splits: the splits it can evaluate. summary: the trainer's own summary fields (epochs, steps, seconds, ...).
    """

    state: TrainState
    kept: Callable[[], TrainState]
    history: list[dict]
    best: dict
    evaluate: Callable[[TrainState, str], dict]
    splits: tuple[str, ...]
    summary: dict = field(default_factory=dict)


def run_summary(plan: Plan, mesh: Mesh) -> dict:
    """The summary fields every run has: what was trained on what, where."""
    return {"model": plan.model.name, "weights": plan.model.weights.name if plan.model.weights else None,
            "strategy": plan.strategy, "trainer": plan.trainer, "head_layers": list(plan.model.head_layers),
            "classes": list(plan.dataset.class_names), "input_size": plan.prep.input_size, "devices": mesh.size,
            "splits": {k: len(v) for k, v in plan.dataset.splits.items()}}


def finish(plan: Plan, trained: Trained, mesh: Mesh, extra: dict | None = None) -> dict:
    """Final val of the last state, test of the kept one, `summary.json` and the plots; returns the summary."""
    best = trained.best
    summary = run_summary(plan, mesh) | (extra or {}) | trained.summary | {
        "best_val_accuracy": best["val_accuracy"] if best["epoch"] > 0 else None, "best_epoch": best["epoch"],
        "final_val_accuracy": trained.history[-1].get("val_accuracy") if trained.history else None,
        # what the optimizer keeps (frozen parameters: nothing); 0 for a closed-form or L-BFGS fit
        "optimizer_state_bytes": int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(trained.state.opt_state))),
    }
    if "val" in trained.splits:
        summary["final_val"] = trained.evaluate(trained.state, "val")
        summary["final_val_accuracy"] = summary["final_val"]["accuracy"]
    if "test" in trained.splits:
        # The test split judges the model the run keeps: the best checkpoint by val accuracy.
        summary["best_checkpoint_test"] = trained.evaluate(trained.kept(), "test")
        summary["test_accuracy"] = summary["best_checkpoint_test"]["accuracy"]
    if is_main():
        write_report(plan.workdir, summary, trained.history, plan.dataset.class_names)
    return summary
