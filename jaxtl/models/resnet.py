"""ResNet v1.5 backbones in torchvision's layout (the stride sits in the bottleneck's 3x3 conv), NHWC.

Paddings are explicit and symmetric as in PyTorch (Flax's "SAME" pads a stride-2 conv on the high side only,
which shifts every feature map by half a pixel against the converted weights). BatchNorm uses PyTorch's
epsilon (1e-5) and the equivalent momentum (PyTorch's 0.1 is Flax's 0.9).

Groups: `stem` (7x7 conv, max-pool; output stride 4), `stage1`..`stage4` (output strides 4, 8, 16, 32).
Features: the groups' outputs and `pre_logits`, the global-average-pooled `stage4`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxtl.models.layers import PointwiseConv, batch_norm, global_pool

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's kaiming_normal_(fan_out)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Module:
    if kernel == 1:
        return PointwiseConv(features, stride, kernel_init=_conv_init, dtype=dtype, name=name)
    pad = (kernel - 1) // 2
    return nn.Conv(
        features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
        kernel_init=_conv_init, dtype=dtype, name=name,
    )


def _bn(x: jnp.ndarray, train: bool, dtype: Any, name: str) -> jnp.ndarray:
    return batch_norm(0.9, 1e-5, dtype, name)(x, use_running_average=not train)


def _downsample(x: jnp.ndarray, features: int, stride: int, train: bool, dtype: Any) -> jnp.ndarray:
    if stride == 1 and x.shape[-1] == features:
        return x
    return _bn(_conv(features, 1, stride, dtype, "downsample_conv")(x), train, dtype, "downsample_bn")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        f, dt = self.features, self.dtype
        y = nn.relu(_bn(_conv(f, 3, self.stride, dt, "conv1")(x), train, dt, "bn1"))
        y = _bn(_conv(f, 3, 1, dt, "conv2")(y), train, dt, "bn2")
        return nn.relu(_downsample(x, f, self.stride, train, dt) + y)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (ResNet-50/101/152)."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        f, dt = self.features, self.dtype
        y = nn.relu(_bn(_conv(f, 1, 1, dt, "conv1")(x), train, dt, "bn1"))
        y = nn.relu(_bn(_conv(f, 3, self.stride, dt, "conv2")(y), train, dt, "bn2"))
        y = _bn(_conv(f * self.expansion, 1, 1, dt, "conv3")(y), train, dt, "bn3")
        return nn.relu(_downsample(x, f * self.expansion, self.stride, train, dt) + y)


class Stem(nn.Module):
    """7x7/2 conv, BN, ReLU, 3x3/2 max-pool padded with -inf as PyTorch does."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = nn.relu(_bn(_conv(self.width, 7, 2, self.dtype, "conv")(x), train, self.dtype, "bn"))
        return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


class Stage(nn.Module):
    """A run of residual blocks; the first one may downsample."""

    block_cls: type
    num_blocks: int
    features: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        for i in range(self.num_blocks):
            stride = self.stride if i == 0 else 1
            x = self.block_cls(features=self.features, stride=stride, dtype=self.dtype, name=f"block{i}")(x, train)
        return x


class ResNet(nn.Module):
    """ResNet backbone: `__call__(images, train)` returns `{stem, stage1..stage4, pre_logits}`.

    Attributes:
      stage_sizes: blocks per stage.
      block_cls: `BasicBlock` or `BottleneckBlock`.
      width: channels of the stem (64 in the published models; tests use tiny widths).
      dtype: computation dtype (params stay float32).
    """

    stage_sizes: Sequence[int]
    block_cls: type
    width: int = 64
    dtype: Any = jnp.float32

    groups = ("stem", "stage1", "stage2", "stage3", "stage4")
    features = (*groups, "pre_logits")

    @property
    def feature_channels(self) -> dict[str, int]:
        stages = {f"stage{i + 1}": self.width * 2**i * self.block_cls.expansion for i in range(len(self.stage_sizes))}
        return {"stem": self.width, **stages, "pre_logits": stages[f"stage{len(self.stage_sizes)}"]}

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        out = {}
        x = out["stem"] = Stem(width=self.width, dtype=self.dtype, name="stem")(x, train)
        for i, num_blocks in enumerate(self.stage_sizes):
            stage = Stage(block_cls=self.block_cls, num_blocks=num_blocks, features=self.width * 2**i,
                          stride=1 if i == 0 else 2, dtype=self.dtype, name=f"stage{i + 1}")
            x = out[f"stage{i + 1}"] = stage(x, train)
        out["pre_logits"] = global_pool(x)
        return out


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckBlock)
