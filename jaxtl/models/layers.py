"""Building blocks the backbone families share: BatchNorm as the strategies freeze it, TF "SAME" padding, and a
depthwise convolution that is fast on CPU."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def batch_norm(momentum: float, epsilon: float, dtype: Any, name: str) -> nn.BatchNorm:
    """A BatchNorm layer to be called as `bn(x, use_running_average=not train)`.

    The mode is a call argument, not an attribute, so that the train step can switch the BatchNorm layers of
    frozen parameters to their running statistics (`jaxtl.transfer.freeze.frozen_batchnorm`).
    """
    return nn.BatchNorm(momentum=momentum, epsilon=epsilon, dtype=dtype, use_fast_variance=True, name=name)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/XLA "SAME" padding of one spatial dim: output ceil(size/stride), the odd pixel on the high side."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def global_pool(x: jnp.ndarray) -> jnp.ndarray:
    """Global average pool of an NHWC map, at least float32: `(B, C)`. Already pooled `(B, C)` inputs pass."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.mean(x, axis=(1, 2)) if x.ndim == 4 else x


class DepthwiseConv(nn.Module):
    """Depthwise kxk conv; parameters identical to `nn.Conv(feature_group_count=C)`. `padding` is "SAME" (TF: the
    odd pixel on the high side) or "SYMMETRIC" (PyTorch: (k-1)//2 on both sides).

    XLA's CPU backend runs grouped convolutions an order of magnitude slower than the k*k shifted
    multiply-adds they amount to (measured 17x at 112x112x96), so on CPU it computes those instead; on GPU and
    TPU it uses the native grouped convolution.
    """

    kernel_size: int
    stride: int = 1
    padding: str = "SAME"
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
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
        if jax.default_backend() != "cpu":
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
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
        if self.stride > 1:
            x = x[:, :: self.stride, :: self.stride]
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


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
