"""EfficientNet-Lite0..4 backbones: EfficientNet without squeeze-excite, with ReLU6 and a stem and head conv that
do not scale.

Convolutions use TF-style "SAME" padding (the extra row/column of a stride-2 conv on the bottom/right), which is
what XLA's "SAME" does and what the released weights were trained with. BatchNorm epsilon is 1e-3 and momentum
0.99 as in the TF original.

Groups, chosen so that each `stageN` ends at the same output stride as ResNet's (4, 8, 16, 32): `stem` (stem
conv and the first block run; stride 2), `stage1`..`stage4` (block runs 2, 3, 4-5, 6-7; `stage4` also holds the
1x1 head conv). Features: the groups' outputs and `pre_logits`, the global-average-pooled `stage4`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtl.models.layers import DepthwiseConv, PointwiseConv, batch_norm, global_pool

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) of the seven block runs of Lite0.
_BASE_RUNS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Which block runs make up each layer group.
_GROUP_RUNS = (("stem", (0,)), ("stage1", (1,)), ("stage2", (2,)), ("stage3", (3, 4)), ("stage4", (5, 6)))
_STEM_FEATURES = 32
_HEAD_FEATURES = 1280

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _bn(x: jnp.ndarray, train: bool, dtype: Any, name: str) -> jnp.ndarray:
    return batch_norm(0.99, 1e-3, dtype, name)(x, use_running_average=not train)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Module:
    if kernel == 1:
        return PointwiseConv(features, stride, kernel_init=_conv_init, dtype=dtype, name=name)
    return nn.Conv(
        features, (kernel, kernel), (stride, stride), padding="SAME", use_bias=False, kernel_init=_conv_init,
        dtype=dtype, name=name,
    )


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channel count scaled by `width`, rounded to a multiple of `divisor`, never more than 10% down."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def block_specs(width: float, depth: float) -> tuple[tuple[int, int, int, int, int], ...]:
    """Per-block (kernel, stride, expand_ratio, in_channels, out_channels), with Lite's fixed first/last runs."""
    specs = []
    last = len(_BASE_RUNS) - 1
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_BASE_RUNS):
        cin = _STEM_FEATURES if i == 0 else round_filters(cin, width)
        cout = round_filters(cout, width)
        repeats = repeats if i in (0, last) else int(math.ceil(depth * repeats))
        for j in range(repeats):
            specs.append((kernel, stride if j == 0 else 1, expand, cin if j == 0 else cout, cout))
    return tuple(specs)


def _run_starts(depth: float) -> list[int]:
    starts, total = [], 0
    last = len(_BASE_RUNS) - 1
    for i, run in enumerate(_BASE_RUNS):
        starts.append(total)
        total += run[0] if i in (0, last) else int(math.ceil(depth * run[0]))
    return starts + [total]


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project; identity skip when shapes allow."""

    kernel: int
    stride: int
    expand_ratio: int
    in_features: int
    out_features: int
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        inputs, dt = x, self.dtype
        hidden = self.in_features * self.expand_ratio
        if self.expand_ratio != 1:
            x = nn.relu6(_bn(_conv(hidden, 1, 1, dt, "expand_conv")(x), train, dt, "expand_bn"))
        dw_conv = DepthwiseConv(self.kernel, self.stride, kernel_init=_conv_init, dtype=dt, name="dw_conv")
        x = nn.relu6(_bn(dw_conv(x), train, dt, "dw_bn"))
        x = _bn(_conv(self.out_features, 1, 1, dt, "project_conv")(x), train, dt, "project_bn")
        if self.stride == 1 and self.in_features == self.out_features:
            if train and self.drop_path_rate > 0:
                keep = 1.0 - self.drop_path_rate
                mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
                x = jnp.where(mask, x / keep, 0).astype(x.dtype)
            x = x + inputs
        return x


class LiteGroup(nn.Module):
    """One layer group: optional stem conv, a run of MBConv blocks (named by global index), optional head conv."""

    blocks: Sequence[tuple]  # (index, kernel, stride, expand, cin, cout, drop_path_rate)
    stem_features: int = 0
    head_features: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        dt = self.dtype
        if self.stem_features:
            x = nn.relu6(_bn(_conv(self.stem_features, 3, 2, dt, "conv")(x), train, dt, "bn"))
        for index, kernel, stride, expand, cin, cout, drop in self.blocks:
            x = MBConvBlock(
                kernel=kernel, stride=stride, expand_ratio=expand, in_features=cin, out_features=cout,
                drop_path_rate=drop, dtype=self.dtype, name=f"block{index}",
            )(x, train)
        if self.head_features:
            x = nn.relu6(_bn(_conv(self.head_features, 1, 1, dt, "head_conv")(x), train, dt, "head_bn"))
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone: `__call__(images, train)` returns `{stem, stage1..stage4, pre_logits}`.

    Attributes:
      width, depth: compound-scaling coefficients of the variant.
      drop_path_rate: stochastic depth at the last block, scaled linearly from 0 at the first (train only).
      width_divisor: tests shrink every channel count by this factor to keep the model tiny.
    """

    width: float = 1.0
    depth: float = 1.0
    drop_path_rate: float = 0.0
    width_divisor: int = 1
    dtype: Any = jnp.float32

    groups = tuple(group for group, _ in _GROUP_RUNS)
    features = (*groups, "pre_logits")

    @property
    def feature_channels(self) -> dict[str, int]:
        specs, starts = block_specs(self.width, self.depth), _run_starts(self.depth)
        channels = {group: max(specs[starts[runs[-1] + 1] - 1][4] // self.width_divisor, 1)
                    for group, runs in _GROUP_RUNS}
        head = _HEAD_FEATURES // self.width_divisor
        return channels | {"stage4": head, "pre_logits": head}

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        d = self.width_divisor
        specs = [(k, s, e, max(cin // d, 1), max(cout // d, 1))
                 for k, s, e, cin, cout in block_specs(self.width, self.depth)]
        starts = _run_starts(self.depth)
        out = {}
        for group, runs in _GROUP_RUNS:
            first, stop = starts[runs[0]], starts[runs[-1] + 1]
            blocks = tuple(
                (i, *specs[i], self.drop_path_rate * i / len(specs)) for i in range(first, stop)
            )
            x = out[group] = LiteGroup(
                blocks=blocks,
                stem_features=_STEM_FEATURES // d if group == "stem" else 0,
                head_features=_HEAD_FEATURES // d if group == "stage4" else 0,
                dtype=self.dtype,
                name=group,
            )(x, train)
        out["pre_logits"] = global_pool(x)
        return out


EfficientNetLite0 = functools.partial(EfficientNetLite, width=1.0, depth=1.0)
EfficientNetLite1 = functools.partial(EfficientNetLite, width=1.0, depth=1.1)
EfficientNetLite2 = functools.partial(EfficientNetLite, width=1.1, depth=1.2)
EfficientNetLite3 = functools.partial(EfficientNetLite, width=1.2, depth=1.4)
EfficientNetLite4 = functools.partial(EfficientNetLite, width=1.4, depth=1.8)
