"""BatchNorm that keeps, for the backward pass, only what a bfloat16 step can afford.

The same layer as Flax's `nn.BatchNorm` (parameters `scale` and `bias`, statistics `mean` and `var`, the running
average with `momentum`, the variance from E[x^2] - E[x]^2), computing its statistics and the normalisation in at
least float32. What differs is the gradient in training mode: Flax's, by automatic differentiation, keeps
float32 copies of the activation (`x - mean`, and its product with the scale) for the backward pass, which in a
bfloat16 ResNet-50 step are most of the memory it saves. Here a custom VJP keeps the input as it came (in the
compute dtype) and four numbers per channel, and recomputes the normalised activation in the backward pass, in
float32, in the same fused loop that uses it. Evaluation mode (and frozen layers, which use their running
statistics) is a plain per-channel affine map.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _statistics(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """`(x in at least float32, per-channel mean, per-channel biased variance)`, as Flax computes them."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean = xf.mean(axes)
    var = jnp.maximum(0.0, (xf * xf).mean(axes) - mean * mean)
    return xf, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize_batch(x, scale, bias, epsilon: float, dtype):
    """Training-mode BatchNorm of `x` (channels last) with its own batch statistics: `(y, mean, var)`."""
    return _forward(x, scale, bias, epsilon, dtype)[0]


def _forward(x, scale, bias, epsilon, dtype):
    xf, mean, var = _statistics(x)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = ((xf - mean) * (rstd * scale) + bias).astype(dtype)
    return (y, mean, var), (x, mean, rstd, scale)  # the residuals: x as it came, and per-channel vectors


def _backward(epsilon, dtype, residuals, cotangents):
    x, mean, rstd, scale = residuals
    dy, dmean, dvar = cotangents
    ct = mean.dtype
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    centered = x.astype(ct) - mean
    xhat = centered * rstd
    dyf = dy.astype(ct)
    dbias = dyf.sum(axes)
    dscale = (dyf * xhat).sum(axes)
    gain = scale * rstd
    dx = gain * (dyf - dbias / count - xhat * (dscale / count))
    # the statistics' own cotangents (zero unless something downstream uses the batch mean or variance)
    dx = dx + dmean / count + dvar * (2.0 / count) * centered
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


normalize_batch.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
    """`nn.BatchNorm(use_fast_variance=True)` over the last axis, called as `bn(x, use_running_average)`, whose
    training-mode gradient keeps the input in its own dtype (see the module docstring).

    The mode is a call argument, not an attribute, so that the train step can switch the BatchNorm layers of frozen
    parameters to their running statistics (`jaxtl.transfer.freeze.frozen_batchnorm`).
    """

    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, use_running_average: bool = False) -> jnp.ndarray:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
        if use_running_average:
            xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
            return ((xf - ra_mean.value) * mul + bias).astype(dtype)
        y, mean, var = normalize_batch(x, scale, bias, self.epsilon, dtype)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
