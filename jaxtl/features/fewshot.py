"""Few-shot linear evaluation of cached features: for each number of shots, that many training images of each
class (a seeded draw, nested: the 5-shot set holds the 1-shot set), a closed-form regularised least-squares
classifier, accuracy on held-out images, mean and spread over seeds.

The regression is big_vision's `fewshot_lsr`: features standardised with the shots' own mean and deviation, a
constant bias feature (100: almost unregularised), targets one-hot rescaled to {-1, 1}, L2 strength 2^10, solved
in the primal or the dual, whichever system is smaller. Beside it, a cosine k-nearest-neighbour vote over the same
shots (similarity-weighted, as DINO's kNN evaluation) needs no fit at all.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_L2 = 2.0 ** 10
BIAS_FEATURE = 100.0


def draw_shots(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` examples of each class (all of a class that has fewer), seeded; for one seed the draws
    of growing `shots` are nested."""
    rng = np.random.default_rng(seed)
    order = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    return np.concatenate([indices[:shots] for indices in order])


def ridge_classifier(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = DEFAULT_L2
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(mean, std, weights)`: least squares from standardised `x` (with the bias feature) to {-1, 1} one-hot
    targets, `weights` (D + 1, C) minimising |X w - Y|^2 + l2 |w|^2, in float64."""
    x = np.asarray(x, np.float64)
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    design = _design(x, mean, std)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    n, d = design.shape
    if n >= d:  # primal: (X'X + l2 I)^-1 X'Y
        weights = np.linalg.solve(design.T @ design + l2 * np.eye(d), design.T @ targets)
    else:  # dual: X' (XX' + l2 I)^-1 Y
        weights = design.T @ np.linalg.solve(design @ design.T + l2 * np.eye(n), targets)
    return mean, std, weights


def _design(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    x = (np.asarray(x, np.float64) - mean) / std
    return np.concatenate([x, np.full((len(x), 1), BIAS_FEATURE)], axis=1)


def ridge_predict(model: tuple[np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    mean, std, weights = model
    return np.argmax(_design(x, mean, std) @ weights, axis=1)


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, num_classes: int, k: int) -> np.ndarray:
    """Each row of `x` classified by its `k` nearest training rows by cosine similarity, each voting with its
    similarity clipped at 0 (the vote of a kNN probe head, `jaxtl.models.classifier.knn_vote`)."""
    def unit(a):
        a = np.asarray(a, np.float32)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    train_x, train_y = unit(train_x), np.asarray(train_y)
    k = min(k, len(train_x))
    predictions = []
    for start in range(0, len(x), 1024):  # (1024, N) similarities at a time
        sims = unit(x[start:start + 1024]) @ train_x.T
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(sims), num_classes), np.float64)
        weights = np.maximum(np.take_along_axis(sims, nearest, 1), 0.0)
        np.add.at(votes, (np.arange(len(sims))[:, None], train_y[nearest]), weights)
        predictions.append(np.argmax(votes, axis=1))
    return np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


def fewshot(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray, num_classes: int,
            shots: Sequence[int], seeds: int = 3, l2: float = DEFAULT_L2, knn: int = 0) -> dict:
    """`{"accuracy": {shots: mean}, "std": {shots: spread over seeds}, "per_seed": {shots: [...]},
    "knn_accuracy"/"knn_std" (with `knn` > 0), "fewest_per_class": {shots: images of the scarcest class}}`."""
    train_y, eval_y = np.asarray(train_y), np.asarray(eval_y)
    result = {"accuracy": {}, "std": {}, "per_seed": {}, "fewest_per_class": {}}
    if knn:
        result |= {"knn_accuracy": {}, "knn_std": {}}
    available = np.bincount(train_y, minlength=num_classes)
    for n in shots:
        ridge, vote = [], []
        for seed in range(seeds):
            chosen = draw_shots(train_y, num_classes, n, seed)
            x, y = np.asarray(train_x[chosen]), train_y[chosen]
            ridge.append(float(np.mean(ridge_predict(ridge_classifier(x, y, num_classes, l2), eval_x) == eval_y)))
            if knn:
                vote.append(float(np.mean(knn_predict(x, y, eval_x, num_classes, knn) == eval_y)))
        result["accuracy"][n], result["std"][n] = float(np.mean(ridge)), float(np.std(ridge))
        result["per_seed"][n] = ridge
        result["fewest_per_class"][n] = int(min(n, available.min()))
        if knn:
            result["knn_accuracy"][n], result["knn_std"][n] = float(np.mean(vote)), float(np.std(vote))
    return result
