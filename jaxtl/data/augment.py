"""Augmentation policies on the device, per batch inside the jitted train step: RandAugment, TrivialAugment (Wide),
colour jitter and random erasing, each image drawing its own operations.

Semantics are torchvision's on uint8 tensors (`RandAugment(num_ops, magnitude)` over 31 magnitude bins,
`TrivialAugmentWide`, `ColorJitter(b, c, s)`) and timm's `RandomErasing(mode="pixel")`: the same 14 operations,
magnitude tables, random signs, nearest-neighbour geometry with black fill, and the same uint8 truncation after each
operation, so a policy tuned with those tools means the same here (`tests/test_augment.py` compares each
operation with torchvision's). Pixel values are float32 holding whole numbers 0..255 between operations.

Why the device: one operation per image is chosen at random, which on the host costs a Python call chain per image
on the input pipeline's cores (the scarce resource on an accelerator host, see `benchmarks/input_pipeline.py`),
while on the device every image runs every operation with its own magnitude (identity for the ones it did not
draw) as a few vectorised passes over the batch. `benchmarks/augment.py` measures both. dm-pix has the colour
operations but neither the policies nor per-image geometry, so they are written here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = ("none", "randaugment", "trivialaugment")
OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
       "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SIGNED = frozenset({"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
                    "sharpness"})
BINS = 31  # torchvision's num_magnitude_bins


@dataclass(frozen=True)
class Policy:
    """The device-side augmentation of training batches (`data.augment.*`): `policy` with `magnitude` (a bin of
    31, RandAugment only: TrivialAugment draws one per image) and `num_ops` (RandAugment); `color_jitter`: the
    brightness, contrast and saturation strength (torchvision's `ColorJitter(s, s, s)`, 0: off); `random_erasing`:
    the probability an image gets one rectangle of noise (timm's `reprob`, 0: off)."""

    policy: str = "none"
    magnitude: int = 9
    num_ops: int = 2
    color_jitter: float = 0.0
    random_erasing: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.recolours or self.random_erasing > 0

    @property
    def recolours(self) -> bool:
        """Whether anything runs before normalisation (the policy or the jitter)."""
        return (self.policy != "none" and (self.num_ops > 0 or self.policy == "trivialaugment")
                or self.color_jitter > 0)


def magnitude_table(policy: str, height: int, width: int) -> np.ndarray:
    """(len(OPS), BINS) float32: each operation's magnitude per bin, as torchvision's `_augmentation_space`."""
    wide = policy == "trivialaugment"
    space = np.linspace(0.0, 1.0, BINS, dtype=np.float32)
    enhance = space * (0.99 if wide else 0.9)
    levels = 6 if wide else 4
    rows = {
        "shear_x": space * (0.99 if wide else 0.3),
        "shear_y": space * (0.99 if wide else 0.3),
        "translate_x": space * (32.0 if wide else 150.0 / 331.0 * width),
        "translate_y": space * (32.0 if wide else 150.0 / 331.0 * height),
        "rotate": space * (135.0 if wide else 30.0),
        "brightness": enhance, "color": enhance, "contrast": enhance, "sharpness": enhance,
        "posterize": 8 - np.round(np.arange(BINS) / ((BINS - 1) / levels)),
        "solarize": np.linspace(255.0, 0.0, BINS, dtype=np.float32),
    }
    return np.stack([np.asarray(rows.get(op, np.zeros(BINS)), np.float32) for op in OPS])


def sample_ops(rng: jax.Array, batch: int, policy: Policy, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """`(ops, magnitudes)`, each (num_ops, batch): the operation index (into `OPS`) and signed magnitude each image
    applies at each of its positions, drawn as torchvision draws them."""
    count = 1 if policy.policy == "trivialaugment" else policy.num_ops
    table = jnp.asarray(magnitude_table(policy.policy, height, width))
    k_op, k_bin, k_sign = jax.random.split(rng, 3)
    ops = jax.random.randint(k_op, (count, batch), 0, len(OPS))
    if policy.policy == "trivialaugment":
        bins = jax.random.randint(k_bin, (count, batch), 0, BINS)
    else:
        bins = jnp.full((count, batch), policy.magnitude)
    signed = jnp.asarray([op in SIGNED for op in OPS])[ops]
    flip = jax.random.bernoulli(k_sign, 0.5, (count, batch)) & signed
    return ops, jnp.where(flip, -1.0, 1.0) * table[ops, bins]


# --- operations on float32 (B, H, W, C) batches of whole numbers 0..255, one parameter per image --------------

def _per_image(values: jax.Array) -> jax.Array:
    return values.reshape(-1, 1, 1, 1).astype(jnp.float32)


def _grayscale(x: jax.Array) -> jax.Array:
    """torchvision's `rgb_to_grayscale` of uint8: the weighted sum, truncated. (B, H, W, 1)."""
    return jnp.floor(0.2989 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3])


def _blend(x: jax.Array, other: jax.Array, factor: jax.Array, complement: jax.Array | None) -> jax.Array:
    """torchvision's `_blend` for uint8: `factor * x + (1 - factor) * other`, clamped and truncated. `complement`:
    `1 - factor` where it is known exactly (a magnitude `m` gives `1 + m` and `-m`, as Python's doubles do)."""
    factor = _per_image(factor)
    complement = 1.0 - factor if complement is None else _per_image(complement)
    return jnp.floor(jnp.clip(factor * x + complement * other, 0.0, 255.0))


def brightness(x: jax.Array, factor: jax.Array, complement: jax.Array | None = None) -> jax.Array:
    return _blend(x, jnp.zeros_like(x), factor, complement)


def saturation(x: jax.Array, factor: jax.Array, complement: jax.Array | None = None) -> jax.Array:
    return _blend(x, _grayscale(x), factor, complement)


def contrast(x: jax.Array, factor: jax.Array, complement: jax.Array | None = None) -> jax.Array:
    gray = _grayscale(x).reshape(x.shape[0], -1)
    mean = gray @ jnp.full(gray.shape[1:], 1.0 / gray.shape[1], jnp.float32)  # a dot: 6x XLA:CPU's reduction
    return _blend(x, mean.reshape(-1, 1, 1, 1), factor, complement)


def sharpness(x: jax.Array, factor: jax.Array, complement: jax.Array | None = None) -> jax.Array:
    """Blend with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 inside a one-pixel border."""
    h, w = x.shape[1], x.shape[2]
    edge, centre = np.float32(1 / 13), np.float32(5 / 13)
    window = sum((centre if (i, j) == (1, 1) else edge) * x[:, i:h - 2 + i, j:w - 2 + j]
                 for i in range(3) for j in range(3))
    smooth = x.at[:, 1:-1, 1:-1].set(jnp.round(window))
    return _blend(x, smooth, factor, complement)


def posterize(x: jax.Array, bits: jax.Array) -> jax.Array:
    step = _per_image(2.0 ** (8 - bits.astype(jnp.float32)))
    return jnp.floor(x / step) * step


def solarize(x: jax.Array, threshold: jax.Array) -> jax.Array:
    return jnp.where(x >= _per_image(threshold), 255.0 - x, x)


def autocontrast(x: jax.Array) -> jax.Array:
    low, high = jnp.min(x, axis=(1, 2), keepdims=True), jnp.max(x, axis=(1, 2), keepdims=True)
    flat = high == low
    scale = jnp.where(flat, 1.0, 255.0 / jnp.where(flat, 1.0, high - low))
    return jnp.floor(jnp.clip((x - jnp.where(flat, 0.0, low)) * scale, 0.0, 255.0))


def equalize(x: jax.Array) -> jax.Array:
    """Each channel's histogram equalised (torchvision's `equalize`: its step and rounding)."""
    b, h, w, c = x.shape
    levels = x.astype(jnp.int32)
    channel = (jnp.arange(b)[:, None, None, None] * c + jnp.arange(c)) * 256
    hist = jax.ops.segment_sum(jnp.ones(levels.size, jnp.int32), (channel + levels).reshape(-1),
                               num_segments=b * c * 256).reshape(b, c, 256)
    last = 255 - jnp.argmax(hist[..., ::-1] > 0, axis=-1)  # the highest level present
    top = jnp.take_along_axis(hist, last[..., None], axis=-1)[..., 0]
    step = (h * w - top) // 255
    lut = (jnp.cumsum(hist, axis=-1) + (step // 2)[..., None]) // jnp.maximum(step, 1)[..., None]
    lut = jnp.clip(jnp.concatenate([jnp.zeros_like(lut[..., :1]), lut[..., :-1]], axis=-1), 0, 255)
    mapped = jnp.take_along_axis(lut.reshape(b, 1, c * 256),
                                 (levels + jnp.arange(c) * 256).reshape(b, 1, h * w * c), axis=-1)
    mapped = mapped.reshape(b, h, w, c).astype(jnp.float32)
    return jnp.where((step == 0)[:, None, None, :], x, mapped)


def inverse_affine(ops: jax.Array, magnitudes: jax.Array, height: int, width: int) -> jax.Array:
    """(B, 6): each image's map from output to input pixel centres (relative to the image centre), as
    torchvision's `_get_inverse_affine_matrix` builds for its shear (about the top-left corner), translation (whole
    pixels) and rotation (counter-clockwise, about the centre); identity for the other operations."""
    m, one, zero = magnitudes, jnp.ones_like(magnitudes), jnp.zeros_like(magnitudes)
    t = jnp.trunc(m)
    turn = -m * (math.pi / 180.0)
    cos, sin = jnp.cos(turn), jnp.sin(turn)
    candidates = {
        "shear_x": (one, m, m * (height / 2), zero, one, zero),
        "shear_y": (one, zero, zero, m, one, m * (width / 2)),
        "translate_x": (one, zero, -t, zero, one, zero),
        "translate_y": (one, zero, zero, zero, one, -t),
        "rotate": (cos, sin, zero, -sin, cos, zero),
    }
    identity = jnp.stack((one, zero, zero, zero, one, zero), axis=-1)
    matrix = identity
    for name, rows in candidates.items():
        matrix = jnp.where((ops == OPS.index(name))[:, None], jnp.stack(rows, axis=-1), matrix)
    return matrix


def warp_nearest(x: jax.Array, matrix: jax.Array) -> jax.Array:
    """Each image resampled through its (6,) inverse affine map, nearest neighbour, black outside (torchvision's
    `grid_sample(mode="nearest", align_corners=False)` with zero padding)."""
    b, h, w, c = x.shape
    cols = jnp.arange(w, dtype=jnp.float32) + 0.5 - w / 2
    rows = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5 - h / 2
    m = matrix[:, :, None, None]
    src_x = jnp.round(m[:, 0] * cols + m[:, 1] * rows + m[:, 2] + w / 2 - 0.5)
    src_y = jnp.round(m[:, 3] * cols + m[:, 4] * rows + m[:, 5] + h / 2 - 0.5)
    inside = (src_x >= 0) & (src_x <= w - 1) & (src_y >= 0) & (src_y <= h - 1)
    index = (jnp.clip(src_y, 0, h - 1) * w + jnp.clip(src_x, 0, w - 1)).astype(jnp.int32).reshape(b, h * w, 1)
    moved = jnp.take_along_axis(x.reshape(b, h * w, c), index, axis=1).reshape(b, h, w, c)
    return jnp.where(inside[..., None], moved, 0.0)


def apply_op(x: jax.Array, ops: jax.Array, magnitudes: jax.Array) -> jax.Array:
    """Each image's operation `OPS[ops[i]]` at `magnitudes[i]`: every operation runs on the whole batch with the
    identity's parameter for images that did not draw it."""
    b, h, w, _ = x.shape

    def factor(name: str) -> tuple[jax.Array, jax.Array]:
        drawn = ops == OPS.index(name)
        return jnp.where(drawn, 1.0 + magnitudes, 1.0), jnp.where(drawn, -magnitudes, 0.0)

    x = warp_nearest(x, inverse_affine(ops, magnitudes, h, w))
    x = brightness(x, *factor("brightness"))
    x = saturation(x, *factor("color"))
    x = contrast(x, *factor("contrast"))
    x = sharpness(x, *factor("sharpness"))
    x = posterize(x, jnp.where(ops == OPS.index("posterize"), jnp.trunc(magnitudes), 8.0))
    x = solarize(x, jnp.where(ops == OPS.index("solarize"), magnitudes, 256.0))
    x = jnp.where(_per_image(ops == OPS.index("autocontrast")) > 0, autocontrast(x), x)
    return jnp.where(_per_image(ops == OPS.index("equalize")) > 0, equalize(x), x)


def jitter_params(rng: jax.Array, batch: int, strength: float) -> tuple[jax.Array, jax.Array]:
    """`(order, factors)`: each image's order of brightness (0), contrast (1) and saturation (2), (B, 3), and their
    factors, (3, B), uniform in [max(0, 1 - s), 1 + s] (torchvision's `ColorJitter.get_params`)."""
    k_order, k_factor = jax.random.split(rng)
    order = jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(k_order, batch))
    factors = jax.random.uniform(k_factor, (3, batch), minval=max(0.0, 1.0 - strength), maxval=1.0 + strength)
    return order, factors


def color_jitter(x: jax.Array, order: jax.Array, factors: jax.Array) -> jax.Array:
    """torchvision's `ColorJitter(s, s, s)` with the drawn `jitter_params`, per image."""
    for position in range(3):
        x = brightness(x, jnp.where(order[:, position] == 0, factors[0], 1.0))
        x = contrast(x, jnp.where(order[:, position] == 1, factors[1], 1.0))
        x = saturation(x, jnp.where(order[:, position] == 2, factors[2], 1.0))
    return x


def recolour(rng: jax.Array, images: jax.Array, policy: Policy) -> jax.Array:
    """The policy's operations and the colour jitter on uint8-valued (B, H, W, 3) images -> float32 0..255."""
    x = jnp.clip(jnp.round(images.astype(jnp.float32)), 0.0, 255.0)
    k_ops, k_jitter = jax.random.split(rng)
    if policy.policy != "none":
        ops, magnitudes = sample_ops(k_ops, x.shape[0], policy, x.shape[1], x.shape[2])
        for position in range(ops.shape[0]):
            x = apply_op(x, ops[position], magnitudes[position])
    if policy.color_jitter > 0:
        x = color_jitter(x, *jitter_params(k_jitter, x.shape[0], policy.color_jitter))
    return x


def erasing_boxes(rng: jax.Array, batch: int, height: int, width: int, probability: float,
                  area: tuple[float, float] = (0.02, 1 / 3), aspect: tuple[float, float] = (0.3, 1 / 0.3),
                  attempts: int = 10) -> jax.Array:
    """(B, 4) int32 `(top, left, bottom, right)` per image, empty when it is not erased: with `probability`, timm's
    `RandomErasing` box (area fraction and log-aspect uniform, the first of `attempts` draws that fits)."""
    k_on, k_area, k_aspect, k_top, k_left = jax.random.split(rng, 5)
    target = jax.random.uniform(k_area, (batch, attempts), minval=area[0], maxval=area[1]) * height * width
    ratio = jnp.exp(jax.random.uniform(k_aspect, (batch, attempts), minval=math.log(aspect[0]),
                                       maxval=math.log(aspect[1])))
    h = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
    fits = (h < height) & (w < width)
    first = jnp.argmax(fits, axis=1)
    h, w = jnp.take_along_axis(h, first[:, None], 1)[:, 0], jnp.take_along_axis(w, first[:, None], 1)[:, 0]
    erased = jax.random.bernoulli(k_on, probability, (batch,)) & jnp.any(fits, axis=1)
    top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - w + 1)).astype(jnp.int32)
    h, w = jnp.where(erased, h, 0), jnp.where(erased, w, 0)
    return jnp.stack([top, left, top + h, left + w], axis=-1)


def random_erasing(rng: jax.Array, x: jax.Array, probability: float) -> jax.Array:
    """timm's `RandomErasing(probability, mode="pixel")` on normalised images: one box per erased image filled
    with standard normal noise per pixel and channel."""
    b, h, w, _ = x.shape
    k_box, k_noise = jax.random.split(rng)
    box = erasing_boxes(k_box, b, h, w, probability)[:, :, None, None]
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = (rows >= box[:, 0]) & (rows < box[:, 2]) & (cols >= box[:, 1]) & (cols < box[:, 3])
    noise = jax.random.normal(k_noise, x.shape, jnp.float32).astype(x.dtype)
    return jnp.where(inside[..., None], noise, x)
