"""Evaluating a state: every example of a split scored once (the last batch padded and masked), the step's sums
added up, then the metrics."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from jax.sharding import Mesh
from tqdm import tqdm

from jaxtl.core.processes import is_main
from jaxtl.core.sharding import sum_over_batches
from jaxtl.train.steps import TrainState, eval_metrics


def evaluate(eval_step: Callable, state: TrainState, batches: Iterable[dict], mesh: Mesh, thresholds: Any = None
             ) -> dict:
    """Loss, accuracy, top-5 accuracy, per-class accuracy and confusion matrix of `state` over this process's
    `batches` (`jaxtl.data.pipeline.batches(..., train=False)`) with a `make_eval_step` step; multi-label: mAP and
    F1 at `thresholds` (`eval_metrics`)."""
    totals = sum_over_batches(lambda batch: eval_step(state.params, state.batch_stats, batch), batches, mesh)
    return eval_metrics(totals, thresholds)


def evaluate_split(eval_step: Callable, state: TrainState, source, split: str, mesh: Mesh, progress: bool,
                   thresholds: Any = None) -> dict:
    """`evaluate` over a whole split of a run's source (images or cached features)."""
    stream = tqdm(source.eval_batches(split), total=source.eval_steps(split), desc=split, leave=False,
                  disable=not (progress and is_main()))
    return evaluate(eval_step, state, stream, mesh, thresholds)
