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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtl.core import multilabel
from jaxtl.core.compiler import jit
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.sharding import batch_sharded, replicated
from jaxtl.data.augment import Policy, random_erasing, recolour
from jaxtl.data.pipeline import crop_resize_on_device, flip_on_device
from jaxtl.data.preprocess import normalize
from jaxtl.models.lora import has_lora, merge_lora
from jaxtl.rules import Rule
from jaxtl.transfer.freeze import Freezing, frozen_batchnorm, stop_frozen_gradients
from jaxtl.transfer.optimizer import KERNELS_DECAY, optimizer_from_rules
from jaxtl.transfer.recipe import TTA, Mixing, ema_decay_at, ema_update, mix_batch, soft_targets


@struct.dataclass
class TrainState:
    """`ema`: the exponential moving average of `params` (`train.ema_decay`), `{}` without one."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    ema: Any = struct.field(default_factory=dict)

    @property
    def kept(self) -> TrainState:
        """The state as the run's model: its EMA weights in place of the raw ones when it keeps an EMA."""
        return self.replace(params=self.ema) if has_ema(self.ema) else self


def has_ema(ema: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(ema))


def keep_form(state: TrainState, lora_scale: float = 0.0) -> TrainState:
    """What the best checkpoint holds: the run's model alone (its EMA weights when it keeps one), LoRA factors
    merged into plain kernels, no optimizer state or EMA beside it; what `eval`, `predict`, export and the report
    load. The latest checkpoint keeps the whole state (factors, optimizer state), which is what a resume needs."""
    kept = state.kept
    params = merge_lora(kept.params, lora_scale) if has_lora(kept.params) else kept.params
    return kept.replace(params=params, opt_state=None, ema={})


def create_train_state(variables: dict, tx: optax.GradientTransformation, seed: int = 0, ema: bool = False,
                       mesh: Mesh | None = None) -> TrainState:
    """Step 0 of training `variables` (`{"params", "batch_stats"?}`) with `tx`; `seed` draws dropout and stochastic
    depth (each step folds its number in); `ema` keeps a moving average of the weights, starting at them.

    mesh: the state is put on it, replicated, as a copy (the step donates its state; `variables` stay usable).
    Give it when calling the step yourself: the step returns its state placed so, and a first state placed
    otherwise makes the step compile a second time at its second call (the same program, twice the wait)."""
    params = variables["params"]
    # copies (`jnp.array`), not views: the step donates both trees
    average = jax.tree_util.tree_map(lambda p: jnp.array(p, jnp.float32), params) if ema else {}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                       opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(seed)), ema=average)
    if mesh is None:
        return state
    return jax.device_put(jax.tree_util.tree_map(jnp.array, state), replicated(mesh))


@dataclass(frozen=True)
class Inputs:
    """What a batch feeds the model: `batch[key]` (uint8 images normalised on the device as `prep` says, when
    given), through `model.apply(..., method=method)`. Given an `rng` (the train step), images also get `policy`'s
    augmentation: its operations before normalisation, random erasing after."""

    key: str
    method: str
    prep: Preprocessing | None = None
    policy: Policy = Policy()

    def __call__(self, batch: dict, rng: jax.Array | None = None) -> jnp.ndarray:
        x = batch[self.key]
        if "boxes" in batch:  # random resized crops of the decoded-image cache's windows
            x = crop_resize_on_device(x, batch["boxes"], self.prep.input_size, self.prep.interpolation)
        if "flip" in batch:  # augmentation's mirroring, left to the device by the pipeline
            x = flip_on_device(x, batch["flip"], jnp)
        augments = rng is not None and self.policy.enabled
        if augments and self.policy.recolours:
            x = recolour(jax.random.fold_in(rng, 0), x, self.policy)
        x = normalize(x, self.prep, jnp) if self.prep is not None else x
        if augments and self.policy.random_erasing > 0:
            x = random_erasing(jax.random.fold_in(rng, 1), x, self.policy.random_erasing)
        return x


def image_inputs(prep: Preprocessing, policy: Policy = Policy()) -> Inputs:
    """uint8 image batches from the input pipeline, normalised (and augmented by `policy` in the train step)
    inside the jitted step."""
    return Inputs("images", "__call__", prep, policy)


IMAGES = Inputs("images", "__call__")  # already normalised float images (tests, benchmarks)
FEATURES = Inputs("features", "classify_features")  # pooled head inputs from the feature cache
MAPS = Inputs("features", "classify_maps")  # a stage's maps from the map cache (`Classifier.maps_from`)


def loss_and_metrics(logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray, label_smoothing: float = 0.0,
                     targets: jnp.ndarray | None = None, weights: jnp.ndarray | None = None):
    """Masked sums: loss, correct, top-5 correct, count (the caller divides once over the whole split).

    `targets`: (B, C) probabilities in place of the smoothed one-hot labels (Mixup, CutMix); `weights`: a loss
    weight per example (class weights). Accuracy is always against `labels`.

    Multi-label (`labels` (B, C) multi-hot): the loss is each example's sigmoid binary cross-entropy summed over
    the labels, `weights` (C,) weighting each label's positive term (`pos_weight`); `correct` counts the examples
    whose every label is right at probability 0.5 (exact match); top-5 is not defined (0)."""
    num_classes = logits.shape[-1]
    if labels.ndim == 2:
        if targets is None:
            targets = soft_targets(labels, num_classes, label_smoothing)
        logits32 = logits.astype(jnp.float32)
        positive = jax.nn.softplus(-logits32) * targets * (1.0 if weights is None else weights)
        losses = jnp.sum(positive + jax.nn.softplus(logits32) * (1.0 - targets), axis=-1)
        correct = jnp.all((logits32 > 0) == (labels > 0.5), axis=-1).astype(jnp.float32)
        return {"loss": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
                "top5_correct": jnp.zeros((), jnp.float32), "count": jnp.sum(mask)}
    if targets is None:
        targets = soft_targets(labels, num_classes, label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    if weights is not None:
        losses = losses * weights
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
    mixing: Mixing = Mixing(),
    class_weights: Any = None,
    accumulate_steps: int = 1,
    ema_decay: float = 0.0,
    ema_warmup: bool = True,
    num_classes: int = 0,
) -> Callable:
    """A jitted `train_step(state, batch) -> (state, sums)`: `sums` are the batch's masked loss, correct, top-5
    correct and count (`loss_and_metrics`), to be added up over an epoch, and `nonfinite` (1 when the loss was NaN
    or Inf). With `skip_nonfinite`, a step whose loss or gradient is not finite leaves the state as it was (but
    for its step count) and the sums without its batch; this guard costs a pass over the gradients and a select
    over the state, so it is compiled only when asked for.

    freezing: which parameters train and which BatchNorm layers keep their statistics (`Freezing.from_rules`);
    `tx` must give frozen parameters no update (`optimizer_from_rules` does).
    mixing: Mixup / CutMix of the images (after normalisation) and targets (`jaxtl.transfer.recipe`), images only;
    needs `num_classes`.
    class_weights: (num_classes,) loss weights (`balanced_class_weights`), mixed with the targets; multi-label:
    each label's positive weight (`balanced_class_weights`).
    accumulate_steps: the batch computed in that many micro-batches (a scan inside the step), their gradients
    summed before one update: the same update as the whole batch at a fraction of the activation memory (BatchNorm
    statistics then come from each micro-batch, as they would on more devices).
    ema_decay: > 0 keeps `state.ema`, the moving average of the weights, updated after every step (warmed up as
    timm's with `ema_warmup`).
    """
    trainable, frozen_bn = freezing.trainable, freezing.batchnorm
    weights_by_class = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)
    mixes = mixing.enabled and inputs.key == "images"
    if mixes and num_classes < 2:
        raise ValueError("make_train_step: Mixup / CutMix need num_classes")
    if accumulate_steps < 1:
        raise ValueError(f"make_train_step: accumulate_steps={accumulate_steps} must be at least 1")

    def micro_grads(params, batch_stats, batch: dict, rng, total: jax.Array):
        """Gradients of this (micro-)batch's loss sum over `total` examples, its sums and BatchNorm statistics."""

        def loss_fn(params):
            if trainable is not None:
                params = stop_frozen_gradients(params, trainable)
            x = inputs(batch, jax.random.fold_in(rng, 1 << 21))
            targets, weights = None, None
            multi_label = batch["labels"].ndim == 2
            if weights_by_class is not None:  # multi-label: each label's positive weight, the same for every example
                weights = weights_by_class if multi_label else weights_by_class[batch["labels"]]
            if mixes:
                x, targets, lam = mix_batch(jax.random.fold_in(rng, 1 << 20), x,
                                            soft_targets(batch["labels"], num_classes, label_smoothing), mixing)
                if weights is not None and not multi_label:
                    weights = lam * weights + (1.0 - lam) * weights[::-1]
            with frozen_batchnorm(frozen_bn):
                (logits, _), updates = model.apply(
                    {"params": params, "batch_stats": batch_stats}, x, train=True,
                    mutable=["batch_stats"], rngs={"dropout": rng}, method=inputs.method,
                )
            sums = loss_and_metrics(logits, batch["labels"], batch["mask"], label_smoothing, targets, weights)
            return sums["loss"] / jnp.maximum(total, 1.0), (sums, updates.get("batch_stats", {}))

        return jax.grad(loss_fn, has_aux=True)(params)

    def gradients(state: TrainState, batch: dict, rng):
        total = jnp.sum(batch["mask"])
        if accumulate_steps == 1:
            grads, (sums, batch_stats) = micro_grads(state.params, state.batch_stats, batch, rng, total)
            return grads, sums, batch_stats
        # micro-batch j is examples j, j + k, j + 2k, ...: every device holds its share of each
        k = accumulate_steps
        micro = jax.tree_util.tree_map(
            lambda x: jax.lax.with_sharding_constraint(
                x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1),
                NamedSharding(mesh, P(None, "data"))), batch)

        def body(carry, xs):
            grads_sum, sums_sum, batch_stats = carry
            index, part = xs
            grads, (sums, batch_stats) = micro_grads(state.params, batch_stats, part,
                                                     jax.random.fold_in(rng, index), total)
            return (jax.tree_util.tree_map(jnp.add, grads_sum, grads),
                    jax.tree_util.tree_map(jnp.add, sums_sum, sums), batch_stats), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        zero_sums = {key: jnp.zeros((), jnp.float32) for key in ("loss", "correct", "top5_correct", "count")}
        (grads, sums, batch_stats), _ = jax.lax.scan(body, (zeros, zero_sums, state.batch_stats),
                                                     (jnp.arange(k), micro))
        return grads, sums, batch_stats

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        grads, sums, batch_stats = gradients(state, batch, dropout_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema_decay > 0:
            ema = ema_update(state.ema, params, ema_decay_at(ema_decay, state.step, ema_warmup))
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                                  ema=ema)
        if not skip_nonfinite:  # the loop stops at a non-finite loss; saving refuses a non-finite state
            return new_state, sums | {"nonfinite": 1.0 - jnp.isfinite(sums["loss"]).astype(jnp.float32)}
        # Skipping: a non-finite loss or gradient changes nothing but the step count, and the batch leaves the sums.
        finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(optax.global_norm(grads))
        kept = state.replace(step=state.step + 1)
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
        sums = {k: jnp.where(finite, v, 0.0) for k, v in sums.items()} | {"nonfinite": 1.0 - finite.astype(jnp.float32)}
        return new_state, sums

    return jit(train_step, in_shardings=(replicated(mesh), batch_sharded(mesh)),
               out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)


def make_eval_step(model: nn.Module, num_classes: int, mesh: Mesh, inputs: Inputs = IMAGES, tta: str = "none"
                   ) -> Callable:
    """A jitted `eval_step(params, batch_stats, batch) -> sums` with a confusion matrix (rows: true class).
    `tta="flip"` scores each image by the mean of its logits and its mirror image's (images only)."""
    if tta not in TTA:
        raise ValueError(f"eval.tta={tta!r}: choose one of {', '.join(TTA)}")

    lora_scale = getattr(model, "lora_scale", 0.0)

    def eval_step(params, batch_stats, batch: dict) -> dict:
        if lora_scale:  # evaluation runs the merged kernels, as the kept model and prediction do
            params = merge_lora(params, lora_scale)
        x = inputs(batch)
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False, method=inputs.method)
        if tta == "flip" and inputs.key == "images":
            mirrored, _ = model.apply({"params": params, "batch_stats": batch_stats}, x[:, :, ::-1], train=False,
                                      method=inputs.method)
            logits = (logits.astype(jnp.float32) + mirrored.astype(jnp.float32)) / 2
        sums = loss_and_metrics(logits, batch["labels"], batch["mask"])
        if batch["labels"].ndim == 2:  # multi-label: histograms of each label's logits (`jaxtl.core.multilabel`)
            cells = jnp.arange(num_classes) * multilabel.BINS + multilabel.bin_of(logits.astype(jnp.float32), jnp)
            positive = batch["labels"] * batch["mask"][:, None]
            negative = (1.0 - batch["labels"]) * batch["mask"][:, None]
            size = num_classes * multilabel.BINS
            sums["positives"] = jnp.zeros(size).at[cells.reshape(-1)].add(positive.reshape(-1))
            sums["negatives"] = jnp.zeros(size).at[cells.reshape(-1)].add(negative.reshape(-1))
            return sums
        true = jax.nn.one_hot(batch["labels"], num_classes) * batch["mask"][:, None]
        pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
        sums["confusion"] = true.T @ pred
        return sums

    return jit(eval_step, in_shardings=(replicated(mesh), replicated(mesh), batch_sharded(mesh)),
               out_shardings=replicated(mesh))


def eval_metrics(totals: dict, thresholds: Any = None) -> dict:
    """Loss, accuracy, top-5 accuracy (more than 5 classes), per-class accuracy and the confusion matrix from
    `eval_step` sums accumulated over a split.

    Multi-label: loss, exact-match accuracy at 0.5, `map` and the rest of `jaxtl.core.multilabel.multilabel_metrics`
    with `thresholds` (per class or one; None: each label's best F1 on this split, as val chooses them)."""
    count = max(float(totals["count"]), 1.0)
    if "positives" in totals:
        shape = (-1, multilabel.BINS)
        scores = multilabel.multilabel_metrics(np.asarray(totals["positives"]).reshape(shape),
                                               np.asarray(totals["negatives"]).reshape(shape), thresholds)
        return {"loss": float(totals["loss"]) / count, "accuracy": float(totals["correct"]) / count, **scores}
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
    step = make_train_step(model, tx, mesh, freezing=Freezing.from_rules(variables, rules, train_frozen_bn),
                           label_smoothing=label_smoothing, inputs=inputs)
    return step, create_train_state(variables, tx, seed, mesh=mesh)  # a copy: the caller's variables outlive it
