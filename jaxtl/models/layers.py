"""Building blocks the backbone families share: convolutions and BatchNorm as the families configure them,
stochastic depth, TF "SAME" padding, channel rounding, and 1x1 and depthwise convolutions that are fast on CPU."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models.batchnorm import BatchNorm

# torchvision's kaiming_normal_(mode="fan_out") and TF EfficientNet's conv initialiser
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(momentum: float, epsilon: float, dtype: Any, name: str) -> BatchNorm:
    """A BatchNorm layer (`jaxtl.models.batchnorm`: Flax's, keeping its input in the compute dtype for the
    backward pass) to be called as `bn(x, use_running_average=not train)`."""
    return BatchNorm(momentum=momentum, epsilon=epsilon, dtype=dtype, name=name)


@dataclass(frozen=True)
class Norm:
    """A family's BatchNorm settings (Flax momentum: PyTorch's 0.1 is 0.9 here)."""

    momentum: float
    epsilon: float

    def __call__(self, x: jnp.ndarray, train: bool, dtype: Any, name: str) -> jnp.ndarray:
        return batch_norm(self.momentum, self.epsilon, dtype, name)(x, use_running_average=not train)


_PORTABLE = contextvars.ContextVar("jaxtl_portable_ops", default=False)


@contextlib.contextmanager
def portable_ops() -> Iterator[None]:
    """Inside the block, models trace their native operations whatever the backend: for a program that leaves JAX
    (an ONNX or TensorFlow export), where the CPU-only forms below would be served as they are (`DepthwiseConv`'s
    k*k strided slices become gathers that TFLite cannot convert; a grouped convolution is one ONNX `Conv`)."""
    token = _PORTABLE.set(True)
    try:
        yield
    finally:
        _PORTABLE.reset(token)


TORCH_NORM = Norm(0.9, 1e-5)  # PyTorch's BatchNorm2d defaults (torchvision's ResNet, VGG, MobileNetV2)
TF_NORM = Norm(0.99, 1e-3)  # TF EfficientNet's


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/XLA "SAME" padding of one spatial dim: output ceil(size/stride), the odd pixel on the high side."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv(features: int, kernel: int, stride: int, padding: str, dtype: Any, name: str) -> nn.Module:
    """A bias-free kxk convolution: `padding` "SAME" (TF: the odd pixel on the high side) or "SYMMETRIC" (PyTorch:
    (k-1)//2 on both sides, so a stride-2 conv does not shift the map by half a pixel against converted weights).
    A 1x1 convolution is a `PointwiseConv` (a matrix product)."""
    if kernel == 1:
        return PointwiseConv(features, stride, kernel_init=CONV_INIT, dtype=dtype, name=name)
    pad = "SAME" if padding == "SAME" else [((kernel - 1) // 2, (kernel - 1) // 2)] * 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=pad, use_bias=False, kernel_init=CONV_INIT,
                   dtype=dtype, name=name)


def drop_path(module: nn.Module, x: jnp.ndarray, rate: float, train: bool) -> jnp.ndarray:
    """Stochastic depth: in training, a residual branch's output dropped for a random `rate` of the examples and
    scaled by 1 / (1 - rate) for the rest (the `dropout` RNG stream); the identity otherwise."""
    if not train or not rate:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


REMAT = ("none", "blocks")


def rematerialised(block: type, remat: str) -> type:
    """`block` as it runs under `remat`: "none" (the backward pass reads what the forward pass saved) or "blocks"
    (each block's activations are recomputed in the backward pass from its input, so a step keeps one activation
    per block: `jax.checkpoint` saving nothing inside, about a third more compute for a fraction of the memory;
    for batches that would not fit otherwise). Parameter paths and gradients are the same either way; only stochastic
    depth's random masks differ (the lifted transform splits the RNG differently), drawn from the same distribution."""
    if remat == "none":
        return block
    if remat == "blocks":  # argument 2 of `block.__call__(self, x, train)` is static
        return nn.remat(block, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable)
    raise ValueError(f"model.kwargs.remat={remat!r}: choose one of {', '.join(REMAT)}")


def make_divisible(value: float, divisor: int = 8) -> int:
    """A channel count rounded to the nearest multiple of `divisor`, never more than 10% below `value`
    (torchvision's `_make_divisible`, TF EfficientNet's `round_filters`)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * value else rounded)


def global_pool(x: jnp.ndarray) -> jnp.ndarray:
    """Global average pool of an NHWC map, at least float32: `(B, C)`. Already pooled `(B, C)` inputs pass."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.mean(x, axis=(1, 2)) if x.ndim == 4 else x


class DepthwiseConv(nn.Module):
    """Depthwise kxk conv; parameters identical to `nn.Conv(feature_group_count=C)`. `padding` is "SAME" (TF: the
    odd pixel on the high side) or "SYMMETRIC" (PyTorch: (k-1)//2 on both sides).

    XLA's CPU backend runs grouped convolutions an order of magnitude slower than the k*k shifted
    multiply-adds they amount to (measured 17x at 112x112x96), so on CPU it computes those instead; on GPU and
    TPU, and for export (`portable_ops`), it uses the native grouped convolution.
    """

    kernel_size: int
    stride: int = 1
    padding: str = "SAME"
    kernel_init: Any = CONV_INIT
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k, s, channels = self.kernel_size, self.stride, x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, channels), jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if self.padding == "SAME":
            pads = [same_padding(x.shape[1], k, s), same_padding(x.shape[2], k, s)]
        else:
            pads = [((k - 1) // 2, (k - 1) // 2)] * 2
        if jax.default_backend() != "cpu" or _PORTABLE.get():
            return jax.lax.conv_general_dilated(
                x, kernel, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels
            )
        out_h = (x.shape[1] + sum(pads[0]) - k) // s + 1
        out_w = (x.shape[2] + sum(pads[1]) - k) // s + 1
        padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        out = None
        for i in range(k):
            for j in range(k):
                window = padded[:, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s, :]
                term = window * kernel[i, j, 0]
                out = term if out is None else out + term
        return out


class PointwiseConv(nn.Module):
    """A 1x1 convolution (optionally strided) computed as a matrix product; parameters identical to
    `nn.Conv(features, (1, 1), use_bias=False)` (kernel `(1, 1, C_in, C_out)`).

    XLA:CPU runs a 1x1 convolution as a convolution about 3x slower than the same product as a `dot`, and its
    weight gradient 4x slower (measured at 112x112x64, batch 16: forward 74 against 26 ms, weight gradient 228
    against 52 ms); as a `dot` all three are matrix products on every backend. Strided, it samples every
    `stride`-th pixel from the first, as PyTorch's and TF's padding-free 1x1 convolutions do.
    """

    features: int
    stride: int = 1
    kernel_init: Any = CONV_INIT
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
        if self.stride > 1:
            x = x[:, :: self.stride, :: self.stride]
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


def max_pool(x: jnp.ndarray, window: int, stride: int, pad: int = 0) -> jnp.ndarray:
    """`window` x `window` max pooling with `pad` pixels of -inf on each side (PyTorch's `MaxPool2d`): Flax's
    `nn.max_pool`, as one `reduce_window`. For export (`portable_ops`) it is the maximum of `window**2` strided
    slices instead: jax2onnx turns a `reduce_window` into an ONNX `MaxPool` over all four axes, which onnxruntime
    refuses (and it replaces `nn.max_pool` while it traces, losing explicit padding)."""
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    if not _PORTABLE.get():
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), padding)
    padded = jnp.pad(x, padding, constant_values=-jnp.inf)
    out_h, out_w = ((size + 2 * pad - window) // stride + 1 for size in x.shape[1:3])
    out = None
    for i in range(window):
        for j in range(window):
            limit = (x.shape[0], i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, x.shape[3])
            term = jax.lax.slice(padded, (0, i, j, 0), limit, (1, stride, stride, 1))
            out = term if out is None else jnp.maximum(out, term)
    return out


def adaptive_avg_pool(x: jnp.ndarray, size: int) -> jnp.ndarray:
    """PyTorch's `AdaptiveAvgPool2d(size)` on NHWC: output cell i averages input rows floor(i*H/size) to
    ceil((i+1)*H/size), so any input size (smaller ones included) gives `size x size`."""

    def weights(length: int) -> np.ndarray:
        matrix = np.zeros((size, length), np.float32)
        for i in range(size):
            start, end = (i * length) // size, -(-((i + 1) * length) // size)
            matrix[i, start:end] = 1.0 / (end - start)
        return matrix

    rows, cols = weights(x.shape[1]), weights(x.shape[2])
    return jnp.einsum("oh,bhwc,pw->bopc", rows.astype(x.dtype), x, cols.astype(x.dtype))
