"""The logistic-regression head on cached features: L2-regularised multinomial logistic regression, or for
multi-label data (multi-hot labels) one binary logistic regression per label, fitted jointly (the loss is the sum of
the labels' binary cross-entropies, which separates), the strength chosen by val mAP.

Logistic regression follows Kornblith et al. (2019, "Do Better ImageNet Models Transfer Better?"): full-batch
L-BFGS to convergence for every L2 strength of a log-spaced grid, the strength with the best validation
accuracy kept (ties: the lower validation loss). One jitted L-BFGS solve per strength, along the
regularisation path.
Features are standardised with the train split's mean and std for conditioning; the standardisation is folded
back into the layer, so the returned parameters are those of `Head` on raw pooled features and drop into the full
model's `head`. (An MLP head on cached features trains like any other run, by epochs, `jaxtl.train.loop`.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl.core.errors import ConfigError
from jaxtl.core.multilabel import histograms, multilabel_metrics, score_name
from jaxtl.features.featureset import FeatureSet

DEFAULT_L2_GRID = tuple(float(x) for x in np.logspace(-6, 3, 19))  # half-decade steps


@dataclass
class HeadFit:
    """A fitted head: `Head` params for raw features, per-step records, what was chosen, and the fit's wall
    time in seconds."""

    params: dict
    history: list[dict] = field(default_factory=list)
    chosen: dict = field(default_factory=dict)
    seconds: float = 0.0


def _standardizer(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    return mean, np.where(std < 1e-6, 1.0, std).astype(np.float32)


def _fold(kernel: jnp.ndarray, bias: jnp.ndarray, mean: np.ndarray, std: np.ndarray) -> dict:
    """Dense params on standardised inputs -> the same function of raw inputs."""
    kernel = kernel / std[:, None]
    return {"kernel": kernel, "bias": bias - mean @ kernel}


def _losses(logits, labels):
    """Each row's loss: softmax cross-entropy with a class index, or with multi-hot rows the sum of the labels'
    sigmoid binary cross-entropies."""
    if labels.ndim == 2:
        return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).sum(-1)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _scores(name: str, logits: np.ndarray, labels: np.ndarray) -> dict:
    """A split's loss and accuracy (multi-label: exact match at 0.5, and mAP)."""
    record = {f"{name}_loss": float(np.mean(_losses(jnp.asarray(logits), jnp.asarray(labels))))}
    if labels.ndim == 2:
        record[f"{name}_accuracy"] = float(np.mean(np.all((logits > 0) == (labels > 0.5), axis=1)))
        record[f"{name}_map"] = multilabel_metrics(*histograms(logits, labels))["map"]
    else:
        record[f"{name}_accuracy"] = float(np.mean(logits.argmax(-1) == labels))
    return record


def _bucket(size: int) -> int:
    """`size` rounded up on a coarse ladder: 64, then multiples of half the power of two below it (64, 96, 128, 192,
    256, ...: at most half more). The solver is compiled for the padded shape, so fits of nearby sizes (the splits of
    other runs, the layer sets of the advice's probe) share one compiled program: compiling it takes seconds, and
    solving a few thousand examples a fraction of one."""
    if size <= 64:
        return 64
    step = 1 << (size.bit_length() - 2)
    return -(-size // step) * step


@jax.jit
def _lbfgs(x, y, weights, l2, init, max_iter, tol):
    """Minimises `mean CE + l2 / 2 * |kernel|^2` from `init` with L-BFGS; returns `(params, iterations)`. The mean
    is over the rows of weight 1: rows of weight 0 (padding) and all-zero columns (padding: their kernel rows get
    no gradient and stay 0) change nothing. It stops when the gradient's norm is below `tol`, after `max_iter`
    steps, or at a step that left the parameters where they were: the line search found no lower point (near the
    optimum of a weakly regularised problem, whose gradient can stay just above `tol` in float32); seen so, the
    later steps started from the same point and failed alike until `max_iter` (1,000 steps, 25 s a fit)."""
    count = jnp.sum(weights)

    def objective(params):
        losses = _losses(x @ params["kernel"] + params["bias"], y)
        return jnp.sum(losses * weights) / count + 0.5 * l2 * jnp.sum(params["kernel"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        stepped = optax.apply_updates(params, updates)
        moved = jax.tree.reduce(jnp.logical_or, jax.tree.map(lambda a, b: jnp.any(a != b), stepped, params))
        return stepped, state, moved

    def running(carry):
        _, state, moved = carry
        count = optax.tree.get(state, "count")
        return (count == 0) | ((count < max_iter) & moved & (optax.tree.norm(optax.tree.get(state, "grad")) >= tol))

    params, state, _ = jax.lax.while_loop(running, step, (init, opt.init(init), jnp.bool_(True)))
    return params, optax.tree.get(state, "count")


def fit_logistic(
    train: FeatureSet,
    val: FeatureSet,
    num_classes: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    max_iter: int = 1000,
    tol: float = 1e-4,
) -> HeadFit:
    """Multinomial logistic regression, loss `mean CE + l2 / 2 * |W|^2` on standardised features, for every
    `l2` of the grid; keeps the best on `val` (accuracy; multi-label: mAP). Holds both splits' features in memory
    (N x D float32)."""
    if not len(val) and len(l2_grid) > 1:
        raise ConfigError("choosing the L2 strength needs a val split; set data.val_fraction > 0 or give "
                          "probe.l2_grid a single value")
    start = time.perf_counter()
    x_train, x_val = train.rows(), val.rows()
    mean, std = _standardizer(x_train)
    (n, d), rows, columns = x_train.shape, _bucket(len(x_train)), _bucket(x_train.shape[1])
    padded = np.zeros((rows, columns), np.float32)  # standardised in place: one copy of the features
    np.subtract(x_train, mean, out=padded[:n, :d])
    padded[:n, :d] /= std
    x = jnp.asarray(padded)
    labels = np.asarray(train.labels)
    y = jnp.asarray(np.pad(labels, ((0, rows - n),) + ((0, 0),) * (labels.ndim - 1)))
    weights = jnp.asarray(np.arange(rows) < n, jnp.float32)
    # The regularisation path from strong to weak L2, each solve warm-started from the previous solution
    # (as glmnet and scikit-learn's warm_start do): weakly regularised problems converge in far fewer steps.
    params = {"kernel": jnp.zeros((columns, num_classes)), "bias": jnp.zeros((num_classes,))}
    solutions = {}
    for l2 in sorted(l2_grid, reverse=True):
        params, iterations = _lbfgs(x, y, weights, jnp.float32(l2), params, max_iter, tol)
        solution = jax.device_get(params)
        solutions[l2] = ({"kernel": solution["kernel"][:d], "bias": solution["bias"]}, int(iterations))
    history = []
    for l2 in l2_grid:
        solution, iterations = solutions[l2]
        record = {"l2": float(l2), "iterations": iterations}
        for name, x, y in (("train", x_train, train.labels), ("val", x_val, val.labels))[: 1 + bool(len(val))]:
            record |= _scores(name, ((x - mean) / std) @ solution["kernel"] + solution["bias"], np.asarray(y))
        history.append(record)
    score = score_name(labels.ndim == 2)
    best = max(range(len(history)), key=lambda i: (history[i].get(score, 0), -history[i].get("val_loss", 0)))
    fc = _fold(*(solutions[l2_grid[best]][0][k] for k in ("kernel", "bias")), mean, std)
    return HeadFit({"fc": fc}, history, dict(history[best]), time.perf_counter() - start)
