"""MobileNetV2 backbones in torchvision's layout: inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1
linear project) with ReLU6, PyTorch's symmetric padding, BatchNorm epsilon 1e-5 (momentum 0.1 in PyTorch's
convention, 0.9 in Flax's).

Groups, chosen so that each `stageN` ends at the same output stride as ResNet's (4, 8, 16, 32), as for
EfficientNet-Lite: `stem` (stem conv and block 1; stride 2), `stage1` (blocks 2-3), `stage2` (4-6), `stage3`
(7-13), `stage4` (14-17 and the 1x1 conv to 1280 channels). Blocks are named by torchvision's `features` index.
Features: the groups' outputs and `pre_logits`, the global-average-pooled `stage4`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtl.models.layers import DepthwiseConv, PointwiseConv, batch_norm, global_pool

# (expand_ratio, channels, repeats, stride) of the seven block runs, as in the paper and torchvision.
_RUNS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# The blocks (torchvision `features` indices) of each group; index 18 is the final 1x1 conv.
_GROUP_BLOCKS = (("stem", range(1, 2)), ("stage1", range(2, 4)), ("stage2", range(4, 7)), ("stage3", range(7, 14)),
                 ("stage4", range(14, 18)))
_STEM_FEATURES, _LAST_FEATURES = 32, 1280

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's kaiming_normal_(fan_out)


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: the nearest multiple of `divisor`, never more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def block_specs(width: float) -> tuple[tuple[int, int, int, int, int], ...]:
    """`(index, expand_ratio, stride, in_channels, out_channels)` of blocks 1..17."""
    specs, cin, index = [], make_divisible(_STEM_FEATURES * width), 1
    for expand, channels, repeats, stride in _RUNS:
        cout = make_divisible(channels * width)
        for j in range(repeats):
            specs.append((index, expand, stride if j == 0 else 1, cin, cout))
            cin, index = cout, index + 1
    return tuple(specs)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Module:
    if kernel == 1:
        return PointwiseConv(features, stride, kernel_init=_conv_init, dtype=dtype, name=name)
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=_conv_init, dtype=dtype, name=name)


def _bn(x: jnp.ndarray, train: bool, dtype: Any, name: str) -> jnp.ndarray:
    return batch_norm(0.9, 1e-5, dtype, name)(x, use_running_average=not train)


class InvertedResidual(nn.Module):
    """1x1 expand (unless expand_ratio is 1), 3x3 depthwise, 1x1 linear project; identity skip when shapes allow."""

    expand_ratio: int
    stride: int
    in_features: int
    out_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        inputs, dt = x, self.dtype
        hidden = int(round(self.in_features * self.expand_ratio))
        if self.expand_ratio != 1:
            x = nn.relu6(_bn(_conv(hidden, 1, 1, dt, "expand_conv")(x), train, dt, "expand_bn"))
        dw_conv = DepthwiseConv(3, self.stride, "SYMMETRIC", kernel_init=_conv_init, dtype=dt, name="dw_conv")
        x = nn.relu6(_bn(dw_conv(x), train, dt, "dw_bn"))
        x = _bn(_conv(self.out_features, 1, 1, dt, "project_conv")(x), train, dt, "project_bn")
        if self.stride == 1 and self.in_features == self.out_features:
            x = x + inputs
        return x


class MobileNetV2Group(nn.Module):
    """One group: optional stem conv, a run of blocks (named by torchvision index), optional final 1x1 conv."""

    blocks: tuple
    stem_features: int = 0
    last_features: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        dt = self.dtype
        if self.stem_features:
            x = nn.relu6(_bn(_conv(self.stem_features, 3, 2, dt, "conv")(x), train, dt, "bn"))
        for index, expand, stride, cin, cout in self.blocks:
            x = InvertedResidual(expand, stride, cin, cout, dt, name=f"block{index}")(x, train)
        if self.last_features:
            x = nn.relu6(_bn(_conv(self.last_features, 1, 1, dt, "head_conv")(x), train, dt, "head_bn"))
        return x


class MobileNetV2(nn.Module):
    """MobileNetV2 backbone: `__call__(images, train)` returns `{stem, stage1..stage4, pre_logits}`.

    Attributes:
      width: the width multiplier (1.0 for the published model; 0.5 and 0.75 are common smaller ones).
    """

    width: float = 1.0
    dtype: Any = jnp.float32

    groups = tuple(group for group, _ in _GROUP_BLOCKS)
    features = (*groups, "pre_logits")

    @property
    def last_features(self) -> int:
        return make_divisible(_LAST_FEATURES * max(1.0, self.width))

    @property
    def feature_channels(self) -> dict[str, int]:
        specs = {spec[0]: spec for spec in block_specs(self.width)}
        channels = {group: specs[blocks[-1]][4] for group, blocks in _GROUP_BLOCKS}
        return channels | {"stage4": self.last_features, "pre_logits": self.last_features}

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        specs = {spec[0]: spec for spec in block_specs(self.width)}
        out = {}
        for group, blocks in _GROUP_BLOCKS:
            x = out[group] = MobileNetV2Group(
                tuple(specs[i] for i in blocks),
                stem_features=make_divisible(_STEM_FEATURES * self.width) if group == "stem" else 0,
                last_features=self.last_features if group == "stage4" else 0,
                dtype=self.dtype, name=group,
            )(x, train)
        out["pre_logits"] = global_pool(x)
        return out
