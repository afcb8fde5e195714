"""The functional core: `TrainState`, `create_train_state`, and `train_step` / `eval_step`, pure functions of
(state, batch) jitted over a data-parallel mesh, usable in a loop of one's own (README, "Your own loop").

The batch is split over the mesh's `data` axis, the state is replicated, and the state argument is donated.
What freezing means inside the step (no gradient, BatchNorm statistics kept) is `jaxtl.transfer.freeze`. The
same steps train a `Classifier` on images and its head alone on cached features (`FEATURES`): only the batch key
and the model method differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.sharding import batch_sharded, replicated
from jaxtl.data.pipeline import crop_resize_on_device, flip_on_device
from jaxtl.data.preprocess import normalize
from jaxtl.rules import Rule
from jaxtl.transfer.freeze import Freezing, frozen_batchnorm, stop_frozen_gradients
from jaxtl.transfer.optimizer import KERNELS_DECAY, optimizer_from_rules


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def create_train_state(variables: dict, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """Step 0 of training `variables` (`{"params", "batch_stats"?}`) with `tx`; `seed` draws dropout and stochastic
    depth (each step folds its number in)."""
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(seed)))


@dataclass(frozen=True)
class Inputs:
    """What a batch feeds the model: `batch[key]` (uint8 images normalised on the device as `prep` says, when
    given), through `model.apply(..., method=method)`."""

    key: str
    method: str
    prep: Preprocessing | None = None

    def __call__(self, batch: dict) -> jnp.ndarray:
        x = batch[self.key]
        if "boxes" in batch:  # random resized crops of the decoded-image cache's windows
            x = crop_resize_on_device(x, batch["boxes"], self.prep.input_size, self.prep.interpolation)
        if "flip" in batch:  # augmentation's mirroring, left to the device by the pipeline
            x = flip_on_device(x, batch["flip"], jnp)
        return normalize(x, self.prep, jnp) if self.prep is not None else x


def image_inputs(prep: Preprocessing) -> Inputs:
    """uint8 image batches from the input pipeline, normalised inside the jitted step."""
    return Inputs("images", "__call__", prep)


IMAGES = Inputs("images", "__call__")  # already normalised float images (tests, benchmarks)
FEATURES = Inputs("features", "classify_features")  # pooled head inputs from the feature cache


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
    mesh: Mesh,
    *,
    freezing: Freezing = Freezing(),
    label_smoothing: float = 0.0,
    inputs: Inputs = IMAGES,
    skip_nonfinite: bool = False,
) -> Callable:
    """A jitted `train_step(state, batch) -> (state, sums)`: `sums` are the batch's masked loss, correct, top-5
    correct and count (`loss_and_metrics`), to be added up over an epoch, and `nonfinite` (1 when the loss was NaN
    or Inf). With `skip_nonfinite`, a step whose loss or gradient is not finite leaves the state as it was (but
    for its step count) and the sums without its batch; this guard costs a pass over the gradients and a select
    over the state, so it is compiled only when asked for.

    freezing: which parameters train and which BatchNorm layers keep their statistics (`Freezing.from_rules`);
    `tx` must give frozen parameters no update (`optimizer_from_rules` does).
    """
    trainable, frozen_bn = freezing.trainable, freezing.batchnorm

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            if trainable is not None:
                params = stop_frozen_gradients(params, trainable)
            with frozen_batchnorm(frozen_bn):
                (logits, _), updates = model.apply(
                    {"params": params, "batch_stats": state.batch_stats}, inputs(batch), train=True,
                    mutable=["batch_stats"], rngs={"dropout": dropout_rng}, method=inputs.method,
                )
            sums = loss_and_metrics(logits, batch["labels"], batch["mask"], label_smoothing)
            return sums["loss"] / jnp.maximum(sums["count"], 1.0), (sums, updates.get("batch_stats", {}))

        grads, (sums, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        if not skip_nonfinite:  # the loop stops at a non-finite loss; saving refuses a non-finite state
            return new_state, sums | {"nonfinite": 1.0 - jnp.isfinite(sums["loss"]).astype(jnp.float32)}
        # Skipping: a non-finite loss or gradient changes nothing but the step count, and the batch leaves the sums.
        finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(optax.global_norm(grads))
        kept = state.replace(step=state.step + 1)
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
        sums = {k: jnp.where(finite, v, 0.0) for k, v in sums.items()} | {"nonfinite": 1.0 - finite.astype(jnp.float32)}
        return new_state, sums

    return jax.jit(train_step, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                   out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)


def make_eval_step(model: nn.Module, num_classes: int, mesh: Mesh, inputs: Inputs = IMAGES) -> Callable:
    """A jitted `eval_step(params, batch_stats, batch) -> sums` with a confusion matrix (rows: true class)."""

    def eval_step(params, batch_stats, batch: dict) -> dict:
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, inputs(batch), train=False,
                                method=inputs.method)
        sums = loss_and_metrics(logits, batch["labels"], batch["mask"])
        true = jax.nn.one_hot(batch["labels"], num_classes) * batch["mask"][:, None]
        pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
        sums["confusion"] = true.T @ pred
        return sums

    return jax.jit(eval_step, in_shardings=(replicated(mesh), replicated(mesh), batch_sharded(mesh)),
                   out_shardings=replicated(mesh))


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


def step_for_rules(
    model: nn.Module,
    variables: dict,
    rules: Sequence[Rule],
    schedule: optax.Schedule,
    mesh: Mesh,
    *,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    label_smoothing: float = 0.0,
    train_frozen_bn: bool = False,
    inputs: Inputs = IMAGES,
    seed: int = 0,
) -> tuple[Callable, TrainState]:
    """The jitted train step and initial state of one phase of `rules` (weight decay on kernels), as the loop
    builds them: for benchmarks, tests and notebooks."""
    tx = optimizer_from_rules(variables["params"], rules, schedule, optimizer, weight_decay=weight_decay,
                              momentum=momentum, decay_rules=KERNELS_DECAY)
    state = create_train_state(variables, tx, seed)
    step = make_train_step(model, tx, mesh, freezing=Freezing.from_rules(variables, rules, train_frozen_bn),
                           label_smoothing=label_smoothing, inputs=inputs)
    # A copy: the step donates its state, and the caller's variables must outlive it.
    return step, jax.device_put(jax.tree_util.tree_map(jnp.array, state), replicated(mesh))
