"""Building blocks the backbone families share: convolutions and BatchNorm as the families configure them,
stochastic depth, TF "SAME" padding, channel rounding, and 1x1 and depthwise convolutions that are fast on CPU."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from functools import partial
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


def cpu_forms() -> bool:
    """Whether models trace the forms written for XLA:CPU (depthwise convolutions as shifted multiply-adds, and
    their own gradients for those and for max pooling): on a CPU backend, outside `portable_ops`. Elsewhere they
    trace XLA's native operations. `benchmarks/step_memory.py` replaces it to analyse an accelerator's program."""
    return jax.default_backend() == "cpu" and not _PORTABLE.get()


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
    multiply-adds they amount to (measured 17x at 112x112x96), so on CPU it computes those instead, with its own
    gradient (`_depthwise_cpu`); on GPU and TPU, and for export (`portable_ops`), it uses the native grouped
    convolution.
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
            pads = (same_padding(x.shape[1], k, s), same_padding(x.shape[2], k, s))
        else:
            pads = (((k - 1) // 2, (k - 1) // 2),) * 2
        if not cpu_forms():
            return jax.lax.conv_general_dilated(
                x, kernel, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels
            )
        return _depthwise_cpu(x, kernel, s, pads)


def _depthwise_taps(x: jnp.ndarray, kernel_size: int, stride: int, pads) -> list[jnp.ndarray]:
    """The k*k strided windows of the zero-padded input, row-major over the kernel."""
    return _windows(jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0))), kernel_size, stride)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_cpu(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, pads) -> jnp.ndarray:
    taps = _depthwise_taps(x, kernel.shape[0], stride, pads)
    k = kernel.shape[0]
    out = None
    for t, window in enumerate(taps):
        term = window * kernel[t // k, t % k, 0]
        out = term if out is None else out + term
    return out


def _depthwise_cpu_fwd(x, kernel, stride, pads):
    return _depthwise_cpu(x, kernel, stride, pads), (x, kernel)


def _depthwise_cpu_bwd(stride, pads, residuals, grad):
    """Input gradient: each tap's `grad * weight` put back on the padded grid by an interior-padded `lax.pad`, all
    summed in one elementwise loop. Kernel gradient: per tap, the window times `grad`, folded in halves along
    height and width by elementwise adds down to one pixel, then summed over the batch. Automatic differentiation
    of the forward materialises every shifted window and reduces each with a library reduction (the kernel
    gradient of a 112x112x32 layer at batch 16: 152 ms, folded 25 ms); folding keeps the batch axis, which a
    data-parallel mesh shards, whole."""
    x, kernel = residuals
    grad = _computed_once(grad.astype(jnp.float32))
    k = kernel.shape[0]
    taps = _depthwise_taps(x, k, stride, pads)
    padded_size = (x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1]))
    total, kernel_grad = None, []
    for t, window in enumerate(taps):
        i, j = divmod(t, k)
        spread = _spread(grad * kernel[i, j, 0].astype(jnp.float32), (i, j), stride, padded_size)
        total = spread if total is None else total + spread
        product = _fold_halves(_fold_halves(window.astype(jnp.float32) * grad, 1), 2)
        kernel_grad.append(jnp.sum(product, axis=(0, 1, 2)))
    x_grad = total[:, pads[0][0] : pads[0][0] + x.shape[1], pads[1][0] : pads[1][0] + x.shape[2]]
    kernel_grad = jnp.stack(kernel_grad).reshape(kernel.shape)
    return x_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)


_depthwise_cpu.defvjp(_depthwise_cpu_fwd, _depthwise_cpu_bwd)


def _computed_once(x: jnp.ndarray) -> jnp.ndarray:
    """`x` (unchanged where finite, NaN where not), kept in memory for the k*k shifted reads that follow. XLA:CPU
    fuses the elementwise ops that produce a value into each consumer, so those reads would recompute them k*k
    times in a loop too branchy to vectorise (the input gradient of a 112x112x32 depthwise layer at batch 16:
    98 ms, against 7 ms from memory); it does not duplicate a division into a consumer that reuses its operand."""
    return x / (x * 0 + 1)


def _fold_halves(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """`x` summed along `axis` down to length 1 by adding halves (an odd length gets a zero row first): elementwise
    adds that XLA:CPU fuses into the product before them, several times faster there than a reduction."""
    while x.shape[axis] > 1:
        if x.shape[axis] % 2:
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, 1)
            x = jnp.pad(x, widths)
        half = x.shape[axis] // 2
        x = jax.lax.slice_in_dim(x, 0, half, axis=axis) + jax.lax.slice_in_dim(x, half, 2 * half, axis=axis)
    return x


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
        return channel_product(x, kernel[0, 0])


def channel_product(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """`x`'s last axis times the matrix `w`, as one (pixels, C_in) matrix product: its weight gradient is then
    pixels^T @ grad, which XLA:CPU runs without transposing the (larger) gradient; a 4-D product's is 3.5x slower
    (112x112, 16 -> 96 channels, batch 16)."""
    return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def max_pool(x: jnp.ndarray, window: int, stride: int, pad: int = 0) -> jnp.ndarray:
    """`window` x `window` max pooling with `pad` pixels of -inf on each side (PyTorch's `MaxPool2d`): Flax's
    `nn.max_pool`, as one `reduce_window`.

    On CPU its gradient is `_max_pool_cpu`'s: XLA:CPU differentiates a `reduce_window` through a variadic argmax
    over four index iotas and a scatter, about 10% of a ResNet-18 training step at batch 16. For export
    (`portable_ops`) it is the maximum of `window**2` strided slices: jax2onnx turns a `reduce_window` into an ONNX
    `MaxPool` over all four axes, which onnxruntime refuses (and it replaces `nn.max_pool` while it traces, losing
    explicit padding)."""
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    if _PORTABLE.get():
        padded = jnp.pad(x, padding, constant_values=-jnp.inf)
        return _max_of(_windows(padded, window, stride))
    if cpu_forms():
        return _max_pool_cpu(x, window, stride, pad, x.shape)
    return _reduce_max(x, window, stride, pad)


def _reduce_max(x: jnp.ndarray, window: int, stride: int, pad: int) -> jnp.ndarray:
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), padding)


def _windows(padded: jnp.ndarray, window: int, stride: int) -> list[jnp.ndarray]:
    """The `window**2` strided slices of `padded` (one per output pixel that fits), row-major over the window:
    slice `i * window + j` holds each output pixel's input at window offset (i, j)."""
    out_h, out_w = ((size - window) // stride + 1 for size in padded.shape[1:3])
    return [
        jax.lax.slice(
            padded,
            (0, i, j, 0),
            (padded.shape[0], i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, padded.shape[3]),
            (1, stride, stride, 1),
        )
        for i in range(window)
        for j in range(window)
    ]


def _spread(values: jnp.ndarray, offset: tuple[int, int], stride: int, padded_size: tuple[int, int]) -> jnp.ndarray:
    """The transpose of one of `_windows`' slices: `values` (one per output pixel) put back at their input pixels
    on the padded grid, zeros elsewhere, by an interior-padded `lax.pad` that XLA fuses with its neighbours."""
    (i, j), (out_h, out_w) = offset, values.shape[1:3]
    return jax.lax.pad(
        values,
        jnp.zeros((), values.dtype),
        (
            (0, 0, 0),
            (i, padded_size[0] - i - stride * (out_h - 1) - 1, stride - 1),
            (j, padded_size[1] - j - stride * (out_w - 1) - 1, stride - 1),
            (0, 0, 0),
        ),
    )


def _max_of(terms: list[jnp.ndarray]) -> jnp.ndarray:
    out = terms[0]
    for term in terms[1:]:
        out = jnp.maximum(out, term)
    return out


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_cpu(x: jnp.ndarray, window: int, stride: int, pad: int, shape: tuple[int, ...]) -> jnp.ndarray:
    return _reduce_max(x, window, stride, pad)


def _max_pool_cpu_fwd(x, window, stride, pad, shape):
    """The pooled map, and as the residual which window offset held each maximum (the first in row-major order
    among equal ones, as XLA's select-and-scatter picks): one int8 per output value instead of the input."""
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
    terms = _windows(padded, window, stride)
    out = _max_of(terms)
    offset = jnp.zeros(out.shape, jnp.int8)
    for k in reversed(range(len(terms))):
        offset = jnp.where(terms[k] == out, jnp.int8(k), offset)
    return out, offset


def _max_pool_cpu_bwd(window, stride, pad, shape, offset, grad):
    """Each output's gradient goes back to the input pixel its maximum came from: for every window offset, the
    gradients whose maximum sat there, spread onto the padded input grid by an interior-padded `lax.pad` (all
    elementwise, one fused loop) and summed."""
    padded_size = (shape[1] + 2 * pad, shape[2] + 2 * pad)
    total = None
    for t in range(window * window):
        picked = jnp.where(offset == t, grad, jnp.zeros((), grad.dtype))
        spread = _spread(picked, divmod(t, window), stride, padded_size)
        total = spread if total is None else total + spread
    return (total[:, pad : pad + shape[1], pad : pad + shape[2]],)


_max_pool_cpu.defvjp(_max_pool_cpu_fwd, _max_pool_cpu_bwd)


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
