"""Scores of a multi-label classifier (`data.multi_label`): per-class average precision, F1 at thresholds and the
threshold per class that F1 chooses, from histograms of the logits.

An evaluation adds up, per class, how many positive and how many negative examples had their logit in each of
`BINS` bins of width `WIDTH` over `[-LIMIT, LIMIT]` (logits beyond fall in the end bins). Sums of histograms are
what a data-parallel evaluation already does with its other metrics (every process, every batch, the padding
masked), so a split of any size is scored without gathering its logits. The metrics are then exact for the logits
rounded down to their bin: average precision is scikit-learn's (`sum_k (R_k - R_{k-1}) P_k` over the distinct
scores, highest first), and a threshold is a bin's lower edge, so a probability threshold `p` marks an example
positive exactly when its logit is at least `logit(p)` on that edge. Bins are 0.025 logits wide: two examples
closer than that tie.
"""

from __future__ import annotations

import numpy as np

LIMIT = 12.8
BINS = 1024
WIDTH = 2 * LIMIT / BINS


def score_name(multi_label: bool) -> str:
    """The record's key of the val metric that picks a run's kept model (and ranks `auto`'s candidates): its
    accuracy, or for multi-label data its mean AP."""
    return "val_map" if multi_label else "val_accuracy"


def bin_of(logits, xp=np):
    """The histogram bin of each logit (`xp`: numpy, or jax.numpy inside a step)."""
    return xp.clip(xp.floor((logits + LIMIT) / WIDTH), 0, BINS - 1).astype(xp.int32)


def histograms(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(positives, negatives)`, each (C, BINS): per label, the examples in each bin of its logit (host arrays; the
    eval step adds the same up on the device)."""
    logits, labels = np.asarray(logits, np.float32), np.asarray(labels) > 0.5
    cells = (np.arange(logits.shape[1]) * BINS + bin_of(logits)).reshape(-1)
    size = logits.shape[1] * BINS
    positives = np.bincount(cells, labels.reshape(-1).astype(np.float64), size)
    negatives = np.bincount(cells, (~labels).reshape(-1).astype(np.float64), size)
    return positives.reshape(-1, BINS), negatives.reshape(-1, BINS)


def threshold_bin(probability: np.ndarray | float) -> np.ndarray:
    """The first bin an example must reach to be marked positive at `probability` (its logit, rounded to an edge)."""
    p = np.clip(np.asarray(probability, np.float64), 1e-12, 1 - 1e-12)
    return np.clip(np.round((np.log(p / (1 - p)) + LIMIT) / WIDTH), 0, BINS - 1).astype(np.int64)


def bin_probability(index: np.ndarray) -> np.ndarray:
    """The probability at each bin's lower edge: the threshold that bin stands for."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(index, np.float64) * WIDTH - LIMIT)))


def _from_top(histogram: np.ndarray) -> np.ndarray:
    """Per class and bin, the examples in that bin or above: (C, BINS)."""
    return np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]


def average_precision(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Per class, scikit-learn's average precision of the binned scores; NaN for a class without positives."""
    positives, negatives = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    tp, fp = _from_top(positives), _from_top(negatives)
    total = positives.sum(1)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    ap = (positives * precision).sum(1) / np.maximum(total, 1)
    return np.where(total > 0, ap, np.nan)


def f1_by_bin(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, false positives, false negatives), each (C, BINS): at the threshold of each bin."""
    positives, negatives = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    tp, fp = _from_top(positives), _from_top(negatives)
    return tp, fp, positives.sum(1, keepdims=True) - tp


def best_thresholds(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Per class, the probability threshold of the highest F1 (0.5 for a class without positives). The thresholds
    of equal F1 form runs of bins (a gap between two examples' scores is a run); of the highest-scoring run, the
    middle bin is taken: halfway (in logits) between the examples either side, rather than on one of them."""
    tp, fp, fn = f1_by_bin(positives, negatives)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=2 * tp + fp + fn > 0)
    chosen = np.full(tp.shape[0], 0.5)
    for c in np.flatnonzero(tp[:, 0] > 0):
        best = np.isclose(f1[c], f1[c].max(), rtol=0, atol=1e-12)
        high = BINS - 1 - int(np.argmax(best[::-1]))
        low = high
        while low > 0 and best[low - 1]:
            low -= 1
        chosen[c] = bin_probability((low + high + 1) // 2)
    return chosen


def f1_scores(positives: np.ndarray, negatives: np.ndarray, thresholds: np.ndarray) -> dict:
    """Micro and macro F1 (and per-class F1) with each class's probability threshold."""
    tp, fp, fn = f1_by_bin(positives, negatives)
    index = threshold_bin(np.broadcast_to(thresholds, (tp.shape[0],)))
    rows = np.arange(tp.shape[0])
    tp, fp, fn = tp[rows, index], fp[rows, index], fn[rows, index]
    per_class = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=2 * tp + fp + fn > 0)
    total = 2 * tp.sum() + fp.sum() + fn.sum()
    return {"micro_f1": float(2 * tp.sum() / total) if total else 0.0, "macro_f1": float(per_class.mean()),
            "per_class_f1": per_class.tolist()}


def pr_curves(positives: np.ndarray, negatives: np.ndarray, points: int = 64) -> list[dict]:
    """Per class, its precision-recall curve (highest threshold first) at up to `points` thresholds where
    something changes: what the report draws."""
    tp, fp, fn = f1_by_bin(positives, negatives)
    curves = []
    for c in range(tp.shape[0]):
        changes = np.flatnonzero((np.asarray(positives[c]) + np.asarray(negatives[c])) > 0)[::-1]
        if len(changes) > points:
            changes = changes[np.unique(np.linspace(0, len(changes) - 1, points).round().astype(int))]
        found = tp[c, changes] + fn[c, changes]
        curves.append({
            "recall": np.round(np.divide(tp[c, changes], found, out=np.zeros(len(changes)), where=found > 0), 4
                               ).tolist(),
            "precision": np.round(tp[c, changes] / np.maximum(tp[c, changes] + fp[c, changes], 1), 4).tolist()})
    return curves


def multilabel_metrics(positives: np.ndarray, negatives: np.ndarray, thresholds: np.ndarray | float | None = None
                       ) -> dict:
    """`map` (the mean of the per-class APs, over the classes with a positive example), `per_class_ap`, F1 at
    `thresholds` (per class, or one for all; None: each class's best on these very examples, an optimistic figure
    only for choosing them), the thresholds used, and the precision-recall curves."""
    ap = average_precision(positives, negatives)
    chosen = best_thresholds(positives, negatives) if thresholds is None else np.broadcast_to(
        np.asarray(thresholds, np.float64), ap.shape)
    return {"map": float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else 0.0,
            "per_class_ap": [None if np.isnan(a) else round(float(a), 6) for a in ap],
            **f1_scores(positives, negatives, chosen), "thresholds": [float(t) for t in chosen],
            "pr_curves": pr_curves(positives, negatives)}
