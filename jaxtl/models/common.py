"""Pieces every backbone family shares: the classifier head and the named-output selection."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Classifier(nn.Module):
    """Global average pool, dropout, linear layer. `num_classes=0` keeps only the pooling.

    Returns `(pre_logits, logits)`; pooled features and logits are at least float32 whatever the compute dtype.
    """

    num_classes: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        out_dtype = jnp.promote_types(x.dtype, jnp.float32)
        pre_logits = jnp.mean(x.astype(out_dtype), axis=(1, 2))
        if self.num_classes == 0:
            return pre_logits, None
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(pre_logits) if self.dropout_rate else pre_logits
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(y)
        return pre_logits, logits.astype(out_dtype)


def select_layers(outputs: Mapping[str, jnp.ndarray], layers: Sequence[str], model_name: str):
    """Logits (pooled features when the head is removed) by default, or a dict of the requested outputs."""
    if not layers:
        return outputs["logits"] if outputs["logits"] is not None else outputs["pre_logits"]
    if isinstance(layers, str):
        layers = (layers,)
    unknown = [name for name in layers if name not in outputs]
    if unknown:
        raise ValueError(f"{model_name} has no layer(s) {unknown}; choose from {list(outputs)}")
    if "logits" in layers and outputs["logits"] is None:
        raise ValueError(f"{model_name} was built with num_classes=0 and has no 'logits' output")
    return {name: outputs[name] for name in layers}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/XLA "SAME" padding of one spatial dim: output ceil(size/stride), the odd pixel on the high side."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
    """Depthwise kxk conv with "SAME" padding; parameters identical to `nn.Conv(feature_group_count=C)`.

    XLA's CPU backend runs grouped convolutions an order of magnitude slower than the k*k shifted
    multiply-adds they amount to (measured 17x at 112x112x96), so on CPU it computes those instead; on GPU and
    TPU it uses the native grouped convolution.
    """

    kernel_size: int
    stride: int = 1
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k, s, channels = self.kernel_size, self.stride, x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, channels), jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        pads = [same_padding(x.shape[1], k, s), same_padding(x.shape[2], k, s)]
        if jax.default_backend() != "cpu":
            return jax.lax.conv_general_dilated(
                x, kernel, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels
            )
        out_h, out_w = -(-x.shape[1] // s), -(-x.shape[2] // s)
        padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        out = None
        for i in range(k):
            for j in range(k):
                window = padded[:, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s, :]
                term = window * kernel[i, j, 0]
                out = term if out is None else out + term
        return out


def init_variables(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...] = (1, 32, 32, 3)) -> dict:
    """`model.init` under jit on a small input (parameter shapes do not depend on the input size).

    XLA:CPU compiles the partitionable threefry generator about 4x slower (11 s against 3 s for a tiny ResNet's
    init); variables are replicated, so partitioning their random bits gains nothing and the plain generator is
    used.
    """
    with jax.threefry_partitionable(False):
        return dict(jax.jit(model.init)(key, jnp.zeros(input_shape, jnp.float32)))
