"""The fine-tuning recipe's parts that live inside the train step (Mixup and CutMix, class weights, the exponential
moving average of the weights: pure functions of arrays, jitted with the step) and layer-wise LR decay (LR
multipliers from each parameter's depth).

Mixup and CutMix follow timm's batch mode: one mixing factor per batch, each example mixed with the batch
reversed (example i with example B-1-i), targets mixed with the same factor after label smoothing; with both on,
each batch is one or the other (CutMix with probability `switch_prob`). CutMix's factor is corrected to the area
its box actually covers once clipped to the image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl.rules import tree_paths

CLASS_WEIGHTS = ("none", "balanced")
TTA = ("none", "flip")


@dataclass(frozen=True)
class Mixing:
    """`mixup`, `cutmix`: the Beta distributions' alphas (0: off); `switch_prob`: the chance a batch is CutMixed
    when both are on."""

    mixup: float = 0.0
    cutmix: float = 0.0
    switch_prob: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, ...]:
    """A box `(top, left, bottom, right)` of about `1 - lam` of the image's area, centred uniformly at random and
    clipped to the image (timm's `rand_bbox`)."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (ratio * height).astype(jnp.int32), (ratio * width).astype(jnp.int32)
    cy = jax.random.randint(jax.random.fold_in(rng, 0), (), 0, height)
    cx = jax.random.randint(jax.random.fold_in(rng, 1), (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    return top, left, bottom, right


def mix_batch(rng: jax.Array, images: jax.Array, targets: jax.Array, mixing: Mixing
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(images, targets, lam)`: the batch Mixup'd or CutMix'd with its reverse. `images` NHWC (any dtype the model
    reads), `targets` (B, C) probabilities (one-hot, smoothed). `lam` is the share of each example's own image."""
    use_cutmix = jnp.asarray(mixing.cutmix > 0)
    if mixing.mixup > 0 and mixing.cutmix > 0:
        use_cutmix = jax.random.uniform(jax.random.fold_in(rng, 0)) < mixing.switch_prob
    alpha = jnp.where(use_cutmix, max(mixing.cutmix, 1e-6), max(mixing.mixup, 1e-6))
    lam = jax.random.beta(jax.random.fold_in(rng, 1), alpha, alpha).astype(jnp.float32)
    other = images[::-1]
    height, width = images.shape[1], images.shape[2]
    top, left, bottom, right = cutmix_box(jax.random.fold_in(rng, 2), lam, height, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    cut_lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    cut = jnp.where(inside[None, :, :, None], other, images)
    blend = (lam * images.astype(jnp.float32) + (1.0 - lam) * other.astype(jnp.float32)).astype(images.dtype)
    mixed = jnp.where(use_cutmix, cut, blend)
    lam = jnp.where(use_cutmix, cut_lam.astype(jnp.float32), lam)
    return mixed, lam * targets + (1.0 - lam) * targets[::-1], lam


def soft_targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
    """One-hot targets, smoothed; multi-hot rows (multi-label) smoothed towards 1/2 (each label a two-way choice)."""
    if labels.ndim == 2:
        return labels.astype(jnp.float32) * (1.0 - label_smoothing) + label_smoothing / 2
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """scikit-learn's `balanced` weights: `n_samples / (n_classes * count[c])` (1 for every class when balanced;
    a class absent from `labels` gets 0: no example of it carries weight anyway). Multi-hot rows (multi-label):
    each label's positive weight, `negatives / positives` (PyTorch's `pos_weight`), so that its positive and
    negative examples weigh alike (1 for a label without positives)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        positives = labels.sum(0, dtype=np.float64)
        return np.where(positives > 0, (len(labels) - positives) / np.maximum(positives, 1), 1.0).astype(np.float32)
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


def ema_decay_at(decay: float, step: jax.Array, warmup: bool) -> jax.Array:
    """The EMA's decay at `step` (0-based, before the update): `decay`, or warmed up as timm's `ModelEmaV2` with
    `warmup` (`min(decay, (1 + step) / (10 + step))`, so early weights do not linger)."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay: jax.Array):
    """`decay * ema + (1 - decay) * params`, leaf by leaf (float32)."""
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)


_BLOCK = re.compile(r"^(?:block|conv)(\d+)$")


def layer_depths(params: Any, groups: Sequence[str]) -> tuple[Any, int]:
    """Each parameter's depth for layer-wise LR decay, and the head's depth: the backbone's `groups` in order (input
    to output), each block of a group (`blockN`, VGG's `convN`) one unit deeper than the one before, a group without
    blocks (a stem, VGG's fc) one unit, a group's parameters outside its blocks (ViT's final norm, Lite's last 1x1
    convolution) one unit after its blocks; the head (everything outside `backbone`) one unit after all."""
    units: dict[tuple, int] = {}
    backbone = params.get("backbone", {})
    for g, group in enumerate(groups):
        children = backbone.get(group, {})
        blocks = sorted((int(m.group(1)), name) for name in children if (m := _BLOCK.match(name)))
        for number, _ in blocks:
            units[(g, 0, number)] = len(units)
        if not blocks or len(blocks) < len(children):
            units[(g, 1, 0)] = len(units)
    head = len(units)

    def depth(path: str) -> int:
        parts = path.split("/")
        if parts[0] != "backbone" or len(parts) < 3 or parts[1] not in groups:
            return head
        g = list(groups).index(parts[1])
        m = _BLOCK.match(parts[2])
        return units[(g, 0, int(m.group(1)))] if m and (g, 0, int(m.group(1))) in units else units[(g, 1, 0)]

    return jax.tree_util.tree_map(depth, tree_paths(params)), head


def layer_decay_multipliers(params: Any, groups: Sequence[str], decay: float) -> Any:
    """BEiT's and timm's layer-wise LR decay as a tree of LR multipliers: the head at 1, each unit below it (see
    `layer_depths`) one more factor of `decay`. Multiplied into a strategy's multipliers, so frozen stays frozen."""
    depths, head = layer_depths(params, groups)
    return jax.tree_util.tree_map(lambda d: float(decay ** (head - d)), depths)
