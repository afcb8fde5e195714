"""`train_step` and `eval_step`: pure functions of (state, batch), jitted over a data-parallel mesh.

The batch is split over the mesh's `data` axis, the state is replicated, and the state argument is donated.
Frozen groups enter the loss through `stop_gradient`, so JAX builds no backward pass for them: with
everything below the head frozen, backpropagation stops at the head.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def loss_and_metrics(logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray, label_smoothing: float = 0.0):
    """Masked sums: loss, correct, top-5 correct, count (the caller divides once over the whole split)."""
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    k = min(5, num_classes)
    top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.float32)
    return {
        "loss": jnp.sum(losses * mask),
        "correct": jnp.sum(correct * mask),
        "top5_correct": jnp.sum(top5 * mask),
        "count": jnp.sum(mask),
    }


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    frozen: tuple[str, ...],
    frozen_bn: tuple[str, ...],
    label_smoothing: float,
    mesh: Mesh,
) -> Callable:
    """A jitted `train_step(state, batch) -> (state, metrics)` for one phase's frozen groups and optimizer."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            params = {g: (jax.lax.stop_gradient(p) if g in frozen else p) for g, p in params.items()}
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, batch["images"], train=True,
                frozen_bn=frozen_bn, mutable=["batch_stats"], rngs={"dropout": dropout_rng},
            )
            sums = loss_and_metrics(logits, batch["labels"], batch["mask"], label_smoothing)
            return sums["loss"] / jnp.maximum(sums["count"], 1.0), (sums, updates["batch_stats"])

        grads, (sums, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new_state, sums

    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(train_step, in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                   donate_argnums=0)


def make_eval_step(model: nn.Module, num_classes: int, mesh: Mesh) -> Callable:
    """A jitted `eval_step(params, batch_stats, batch) -> sums` with a confusion matrix (rows: true class)."""

    def eval_step(params, batch_stats, batch: dict) -> dict:
        logits = model.apply({"params": params, "batch_stats": batch_stats}, batch["images"], train=False)
        sums = loss_and_metrics(logits, batch["labels"], batch["mask"])
        true = jax.nn.one_hot(batch["labels"], num_classes) * batch["mask"][:, None]
        pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
        sums["confusion"] = true.T @ pred
        return sums

    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(eval_step, in_shardings=(replicated, replicated, data), out_shardings=replicated)


def eval_metrics(totals: dict) -> dict:
    """Loss, accuracy, top-5 accuracy (more than 5 classes), per-class accuracy and the confusion matrix from
    `eval_step` sums accumulated over a split."""
    count = max(float(totals["count"]), 1.0)
    confusion = np.asarray(totals["confusion"])
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    result = {"loss": float(totals["loss"]) / count, "accuracy": float(totals["correct"]) / count}
    if confusion.shape[0] > 5:
        result["top5_accuracy"] = float(totals["top5_correct"]) / count
    return result | {"per_class_accuracy": per_class.tolist(), "confusion": confusion.astype(int).tolist()}
