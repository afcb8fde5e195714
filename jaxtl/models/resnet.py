"""ResNet v1.5 backbones in torchvision's layout (the stride sits in the bottleneck's 3x3 conv), NHWC, and their
torchvision weights.

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

from jaxtl.models.backbone import GROUPS, PRE_LOGITS, STEM, stage
from jaxtl.models.layers import TORCH_NORM, conv, drop_path, global_pool, max_pool, rematerialised
from jaxtl.models.registry import ModelSpec, register_model, register_weights, torchvision_weights

_norm = TORCH_NORM


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Module:
    return conv(features, kernel, stride, "SYMMETRIC", dtype, name)


def _downsample(x: jnp.ndarray, features: int, stride: int, train: bool, dtype: Any) -> jnp.ndarray:
    if stride == 1 and x.shape[-1] == features:
        return x
    return _norm(_conv(features, 1, stride, dtype, "downsample_conv")(x), train, dtype, "downsample_bn")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    features: int
    stride: int = 1
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        f, dt = self.features, self.dtype
        y = nn.relu(_norm(_conv(f, 3, self.stride, dt, "conv1")(x), train, dt, "bn1"))
        y = _norm(_conv(f, 3, 1, dt, "conv2")(y), train, dt, "bn2")
        return nn.relu(_downsample(x, f, self.stride, train, dt) + drop_path(self, y, self.drop_path_rate, train))


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (ResNet-50/101/152)."""

    features: int
    stride: int = 1
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        f, dt = self.features, self.dtype
        y = nn.relu(_norm(_conv(f, 1, 1, dt, "conv1")(x), train, dt, "bn1"))
        y = nn.relu(_norm(_conv(f, 3, self.stride, dt, "conv2")(y), train, dt, "bn2"))
        y = _norm(_conv(f * self.expansion, 1, 1, dt, "conv3")(y), train, dt, "bn3")
        shortcut = _downsample(x, f * self.expansion, self.stride, train, dt)
        return nn.relu(shortcut + drop_path(self, y, self.drop_path_rate, train))


class Stem(nn.Module):
    """7x7/2 conv, BN, ReLU, 3x3/2 max-pool padded with -inf as PyTorch does."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = nn.relu(_norm(_conv(self.width, 7, 2, self.dtype, "conv")(x), train, self.dtype, "bn"))
        return max_pool(x, 3, 2, pad=1)


class Stage(nn.Module):
    """A run of residual blocks; the first one may downsample."""

    block_cls: type
    num_blocks: int
    features: int
    stride: int
    drop_path_rates: tuple = ()
    remat: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        block_cls = rematerialised(self.block_cls, self.remat)
        for i in range(self.num_blocks):
            rate = self.drop_path_rates[i] if self.drop_path_rates else 0.0
            x = block_cls(features=self.features, stride=self.stride if i == 0 else 1, drop_path_rate=rate,
                          dtype=self.dtype, name=f"block{i}")(x, train)
        return x


class ResNet(nn.Module):
    """ResNet backbone: `__call__(images, train)` returns `{stem, stage1..stage4, pre_logits}`.

    Attributes:
      stage_sizes: blocks per stage.
      block_cls: `BasicBlock` or `BottleneckBlock`.
      width: channels of the stem (64 in the published models; tests use tiny widths).
      drop_path_rate: stochastic depth of the last block's residual branch, linear from 0 at the first (timm's).
      remat: "blocks" recomputes each block's activations in the backward pass (`layers.rematerialised`).
      dtype: computation dtype (params stay float32).
    """

    stage_sizes: Sequence[int]
    block_cls: type
    width: int = 64
    drop_path_rate: float = 0.0
    remat: str = "none"
    dtype: Any = jnp.float32

    groups = GROUPS
    features = (*GROUPS, PRE_LOGITS)

    @property
    def feature_channels(self) -> dict[str, int]:
        stages = {stage(i + 1): self.width * 2**i * self.block_cls.expansion for i in range(len(self.stage_sizes))}
        return {STEM: self.width, **stages, PRE_LOGITS: stages[stage(len(self.stage_sizes))]}

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        out = {}
        x = out[STEM] = Stem(width=self.width, dtype=self.dtype, name=STEM)(x, train)
        total, first = sum(self.stage_sizes), 0
        for i, num_blocks in enumerate(self.stage_sizes):
            rates = tuple(self.drop_path_rate * (first + j) / max(total - 1, 1) for j in range(num_blocks))
            first += num_blocks
            x = out[stage(i + 1)] = Stage(self.block_cls, num_blocks, self.width * 2**i, 1 if i == 0 else 2, rates,
                                          self.remat, self.dtype, name=stage(i + 1))(x, train)
        out[PRE_LOGITS] = global_pool(x)
        return out


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckBlock)

for _depth, _build, _default in ((18, ResNet18, "tv_in1k"), (34, ResNet34, "tv_in1k"), (50, ResNet50, "tv2_in1k"),
                                 (101, ResNet101, "tv2_in1k"), (152, ResNet152, "tv2_in1k")):
    register_model(ModelSpec(f"resnet{_depth}", "resnet", _build, f"resnet{_depth}.{_default}", 224))
register_weights(
    *torchvision_weights("resnet18", tv_in1k=("f37072fd", 69.758)),
    *torchvision_weights("resnet34", tv_in1k=("b627a593", 73.314)),
    *torchvision_weights("resnet50", tv_in1k=("0676ba61", 76.130), tv2_in1k=("11ad3fa6", 80.858)),
    *torchvision_weights("resnet101", tv_in1k=("63fe2227", 77.374), tv2_in1k=("cd907fc2", 81.886)),
    *torchvision_weights("resnet152", tv_in1k=("394f9c45", 78.312), tv2_in1k=("f82ba261", 82.284)),
)
