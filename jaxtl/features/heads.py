"""Heads trained on cached features: L2-regularised multinomial logistic regression and a small MLP.

Logistic regression follows Kornblith et al. (2019, "Do Better ImageNet Models Transfer Better?"): full-batch
L-BFGS to convergence for every L2 strength of a log-spaced grid, the strength with the best validation
accuracy kept (ties: the lower validation loss). One jitted L-BFGS solve per strength, along the
regularisation path.
Features are standardised with the train split's mean and std for conditioning; the standardisation is folded
back into the first layer, so the returned parameters are those of `Classifier` on raw pooled features and drop
into the full model's `head`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl.models.common import Classifier
from jaxtl.train.steps import loss_and_metrics
from jaxtl.transfer.optimizer import make_optimizer, make_schedule
from jaxtl.transfer.strategies import Phase

DEFAULT_L2_GRID = tuple(float(x) for x in np.logspace(-6, 3, 19))  # half-decade steps


class FeatureSet:
    """The pooled features of one split, from one or more layers (memory-mapped arrays), concatenated on read."""

    def __init__(self, arrays: Sequence[np.ndarray], labels: np.ndarray):
        self.arrays, self.labels = list(arrays), np.asarray(labels)
        if any(a.ndim != 2 or len(a) != len(self.labels) for a in self.arrays):
            raise ValueError(f"features must be pooled (N, C) arrays with N={len(self.labels)}, got "
                             f"{[a.shape for a in self.arrays]}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return sum(a.shape[1] for a in self.arrays)

    def rows(self, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """`(len(index), dim)` float32; row reads from the memory maps go in file order."""
        if isinstance(index, slice):
            return np.concatenate([np.asarray(a[index], np.float32) for a in self.arrays], axis=1)
        order = np.argsort(index, kind="stable")
        out = np.empty((len(index), self.dim), np.float32)
        out[order] = np.concatenate([np.asarray(a[index[order]], np.float32) for a in self.arrays], axis=1)
        return out


@dataclass
class HeadFit:
    """A fitted head: `Classifier` params for raw features, per-step records, what was chosen, and the fit's wall
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


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@jax.jit
def _lbfgs(x, y, l2, init, max_iter, tol):
    """Minimises `mean CE + l2 / 2 * |kernel|^2` from `init` with L-BFGS; returns `(params, iterations)`."""

    def objective(params):
        logits = x @ params["kernel"] + params["bias"]
        return _cross_entropy(logits, y) + 0.5 * l2 * jnp.sum(params["kernel"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(params, updates), state

    def running(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        return (count == 0) | ((count < max_iter) & (optax.tree.norm(optax.tree.get(state, "grad")) >= tol))

    params, state = jax.lax.while_loop(running, step, (init, opt.init(init)))
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
    `l2` of the grid; keeps the best on `val`. Holds both splits' features in memory (N x D float32)."""
    if not len(val) and len(l2_grid) > 1:
        raise ValueError("choosing the L2 strength needs a val split; set data.val_fraction > 0 or give "
                         "features.l2_grid a single value")
    start = time.perf_counter()
    x_train, x_val = train.rows(), val.rows()
    mean, std = _standardizer(x_train)
    x, y = jnp.asarray((x_train - mean) / std), jnp.asarray(train.labels)
    # The regularisation path from strong to weak L2, each solve warm-started from the previous solution
    # (as glmnet and scikit-learn's warm_start do): weakly regularised problems converge in far fewer steps.
    params = {"kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros((num_classes,))}
    solutions = {}
    for l2 in sorted(l2_grid, reverse=True):
        params, iterations = _lbfgs(x, y, jnp.float32(l2), params, max_iter, tol)
        solutions[l2] = (jax.device_get(params), int(iterations))
    history = []
    for l2 in l2_grid:
        solution, iterations = solutions[l2]
        record = {"l2": float(l2), "iterations": iterations}
        for name, x, y in (("train", x_train, train.labels), ("val", x_val, val.labels))[: 1 + bool(len(val))]:
            logits = ((x - mean) / std) @ solution["kernel"] + solution["bias"]
            record[f"{name}_loss"] = float(_cross_entropy(logits, y))
            record[f"{name}_accuracy"] = float(np.mean(logits.argmax(-1) == y))
        history.append(record)
    best = max(range(len(history)), key=lambda i: (history[i].get("val_accuracy", 0), -history[i].get("val_loss", 0)))
    fc = _fold(*(solutions[l2_grid[best]][0][k] for k in ("kernel", "bias")), mean, std)
    return HeadFit({"fc": fc}, history, dict(history[best]), time.perf_counter() - start)


def _feature_batches(features: FeatureSet, batch_size: int, rng: np.random.Generator | None):
    order = rng.permutation(len(features)) if rng is not None else np.arange(len(features))
    stop = len(order) - len(order) % batch_size if rng is not None else len(order)
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield features.rows(index), features.labels[index]


def fit_mlp(
    train: FeatureSet,
    val: FeatureSet,
    num_classes: int,
    *,
    hidden: int,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "adamw",
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    warmup_epochs: float = 0.0,
    dropout_rate: float = 0.0,
    label_smoothing: float = 0.0,
    seed: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
) -> HeadFit:
    """A `Classifier(hidden=...)` trained by minibatches streamed from the (memory-mapped) features; the
    epoch with the best val accuracy is kept. Train mean/std come from the first 10,000 rows."""
    sample = train.rows(np.arange(min(len(train), 10_000)))
    mean, std = _standardizer(sample)
    head = Classifier(num_classes=num_classes, hidden=hidden, dropout_rate=dropout_rate)
    params = {"head": head.init(jax.random.key(seed), jnp.zeros((1, train.dim)))["params"]}
    steps_per_epoch = max(len(train) // batch_size, 1)
    batch_size = min(batch_size, len(train))
    schedule = make_schedule(lr, epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch))
    tx = make_optimizer(params, Phase({"head": 1.0}, epochs), schedule, optimizer, weight_decay, momentum)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y, key):
        def loss_fn(p):
            logits = head.apply({"params": p["head"]}, (x - mean) / std, train=True, rngs={"dropout": key})
            sums = loss_and_metrics(logits, y, jnp.ones_like(y, jnp.float32), label_smoothing)
            return sums["loss"] / sums["count"], sums

        grads, sums = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, sums

    @jax.jit
    def eval_logits(params, x):
        return head.apply({"params": params["head"]}, (x - mean) / std)

    history, best, best_params = [], (-1.0, 0.0), params
    key = jax.random.key(seed)
    for epoch in range(epochs):
        start = time.perf_counter()
        totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        rng = np.random.default_rng([seed, epoch])
        for step, (x, y) in enumerate(_feature_batches(train, batch_size, rng)):
            params, opt_state, sums = train_step(params, opt_state, x, y, jax.random.fold_in(key, epoch * 100_003 + step))
            totals = {k: totals[k] + float(sums[k]) for k in totals}
        record = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                  "train_loss": totals["loss"] / totals["count"], "train_accuracy": totals["correct"] / totals["count"]}
        if len(val):
            logits = np.concatenate([np.asarray(eval_logits(params, x)) for x, _ in _feature_batches(val, 1024, None)])
            record["val_loss"] = float(_cross_entropy(logits, val.labels))
            record["val_accuracy"] = float(np.mean(logits.argmax(-1) == val.labels))
            if (record["val_accuracy"], -record["val_loss"]) > best:
                best, best_params = (record["val_accuracy"], -record["val_loss"]), params
        else:
            best_params = params
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        if on_epoch:
            on_epoch(record)
    head_params = dict(best_params["head"])
    first = "hidden" if hidden else "fc"
    head_params[first] = _fold(head_params[first]["kernel"], head_params[first]["bias"], mean, std)
    chosen = max(history, key=lambda r: (r.get("val_accuracy", 0.0), -r.get("val_loss", 0.0))) if len(val) else history[-1]
    return HeadFit(head_params, history, dict(chosen), sum(record["seconds"] for record in history))
