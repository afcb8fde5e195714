"""Pieces every backbone family shares: the classifier head and the named-output selection."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Classifier(nn.Module):
    """The head: dropout and a linear layer, or with `hidden > 0` a small MLP (Dense, ReLU, dropout, Dense).

    Takes the pooled features `(B, D)` (`pool_features`), so the same module trains on cached features; logits are
    at least float32 whatever the compute dtype.
    """

    num_classes: int
    hidden: int = 0
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        out_dtype = jnp.promote_types(features.dtype, jnp.float32)
        y = features
        if self.hidden:
            y = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(y))
        if self.dropout_rate:
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(y).astype(out_dtype)


DEFAULT_HEAD_LAYERS = ("stage4",)
HEAD_KWARGS = ("head_layers", "head_hidden")  # build arguments that change the head only
FEATURE_LAYERS = ("stem", "stage1", "stage2", "stage3", "stage4")  # the layers a head can read, pooled


def check_head_layers(head_layers: Sequence[str], model_name: str) -> tuple[str, ...]:
    head_layers = (head_layers,) if isinstance(head_layers, str) else tuple(head_layers)
    unknown = [name for name in head_layers if name not in FEATURE_LAYERS]
    if not head_layers or unknown:
        raise ValueError(f"{model_name}: head_layers {list(head_layers)} must be a non-empty subset of "
                         f"{list(FEATURE_LAYERS)}")
    return head_layers


def pool_features(maps: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """Global average pool of each NHWC map (at least float32), concatenated: `(B, sum of channels)`."""
    pooled = [jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2)) for x in maps]
    return pooled[0] if len(pooled) == 1 else jnp.concatenate(pooled, axis=-1)


def classify(module: nn.Module, outputs: dict, train: bool, layers: Sequence[str]):
    """Adds `pre_logits` (the pooled `module.head_layers`) and `logits` to a backbone's `outputs`; returns
    `select_layers` of them. Shared by every family's `__call__`."""
    head_layers = check_head_layers(module.head_layers, type(module).__name__)
    outputs["pre_logits"] = pool_features([outputs[name] for name in head_layers])
    outputs["logits"] = None
    if module.num_classes:
        head = Classifier(num_classes=module.num_classes, hidden=module.head_hidden,
                          dropout_rate=module.dropout_rate, dtype=module.dtype, name="head")
        outputs["logits"] = head(outputs["pre_logits"], train)
    return select_layers(outputs, layers, type(module).__name__)


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
