"""The end of every run, whatever trained it: the final model evaluated on val, the kept model (the best
checkpoint by val accuracy, or for multi-label data val mAP) judged on test, and the summary and report written
(process 0). A multi-label run also fixes its thresholds here: `eval.threshold`, or per label the one of the kept
model's best F1 on val; the summary records them (`thresholds`) and test, `eval` and `predict` use them."""

from __future__ import annotations

import functools
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
    epoch (or per L2 strength of a logistic fit). best: `{plan.score, "epoch"}` (epoch -1: no val split).
    evaluate(state, split, thresholds=None): that split's metrics, on the trainer's own inputs (images or cached
    features); multi-label: F1 at `thresholds`.
    splits: the splits it can evaluate. summary: the trainer's own summary fields (epochs, steps, seconds, ...).
    """

    state: TrainState
    kept: Callable[[], TrainState]
    history: list[dict]
    best: dict
    evaluate: Callable[..., dict]
    splits: tuple[str, ...]
    summary: dict = field(default_factory=dict)


def run_summary(plan: Plan, mesh: Mesh) -> dict:
    """The summary fields every run has: what was trained on what, where."""
    return {"model": plan.model.name, "weights": plan.model.weights.name if plan.model.weights else None,
            "strategy": plan.strategy, "trainer": plan.trainer, "head_layers": list(plan.model.head_layers),
            "classes": list(plan.dataset.class_names), "input_size": plan.prep.input_size, "devices": mesh.size,
            "splits": {k: len(v) for k, v in plan.dataset.splits.items()}}


def thresholds(plan: Plan, trained: Trained, kept: Callable[[], TrainState]) -> list[float] | None:
    """A multi-label run's probability threshold per label: `eval.threshold` for all, or each label's best F1 of
    the kept model (`kept()`) on val (0.5 without a val split); None for single-label data."""
    if not plan.dataset.multi_label:
        return None
    if plan.threshold is not None or "val" not in trained.splits:
        return [float(plan.threshold or 0.5)] * plan.num_classes
    return trained.evaluate(kept(), "val")["thresholds"]


def finish(plan: Plan, trained: Trained, mesh: Mesh, extra: dict | None = None) -> dict:
    """Final val of the last state, test of the kept one, `summary.json` and the plots; returns the summary."""
    best, score = trained.best, plan.score
    summary = run_summary(plan, mesh) | (extra or {}) | trained.summary | {
        "best_val_accuracy": best.get("val_accuracy") if best["epoch"] > 0 else None, "best_epoch": best["epoch"],
        "final_val_accuracy": trained.history[-1].get("val_accuracy") if trained.history else None,
        # what the optimizer keeps (frozen parameters: nothing); 0 for a closed-form or L-BFGS fit
        "optimizer_state_bytes": int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(trained.state.opt_state))),
    }
    kept = functools.cache(trained.kept)  # restored once, for the thresholds and for test
    chosen = thresholds(plan, trained, kept)
    if chosen is not None:
        summary |= {"multi_label": True, "thresholds": chosen, "best_val_map": best.get(score) if best["epoch"] > 0
                    else None}
    if "val" in trained.splits:
        summary["final_val"] = trained.evaluate(trained.state, "val", chosen)
        summary["final_val_accuracy"] = summary["final_val"]["accuracy"]
        if chosen is not None:
            summary["final_val_map"] = summary["final_val"]["map"]
    if "test" in trained.splits:
        # The test split judges the model the run keeps: the best checkpoint by val accuracy (multi-label: mAP).
        summary["best_checkpoint_test"] = trained.evaluate(kept(), "test", chosen)
        summary["test_accuracy"] = summary["best_checkpoint_test"]["accuracy"]
        if chosen is not None:
            summary["test_map"] = summary["best_checkpoint_test"]["map"]
    if is_main():
        write_report(plan.workdir, summary, trained.history, plan.dataset.class_names)
    return summary
