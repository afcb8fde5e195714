"""VGG-11/13/16/19 backbones, with or without BatchNorm, in torchvision's layout, and torchvision's weights.

Groups: `stage1`..`stage5`, each a run of 3x3 convs (+BatchNorm) and ReLUs ending in a 2x2 max-pool (output strides
2, 4, 8, 16, 32), and `fc`: the 7x7 adaptive average pool, fc6 and fc7 (4096 wide, ReLU and dropout each), the
classic frozen feature extractor of the transfer-learning notes. Features: the stages' outputs and `pre_logits`,
fc7's 4096 features (the head's input in the original); the pooled conv features are `stage5` pooled, which any
head can read (`head.layers=("stage5",)`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxtl.models.backbone import PRE_LOGITS, stage
from jaxtl.models.layers import CONV_INIT, TORCH_NORM, adaptive_avg_pool, max_pool
from jaxtl.models.registry import ModelSpec, register_model, register_weights, torchvision_weights

# Convs per stage and their channels, as in the paper's configurations A, B, D, E.
CONFIGS = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}
_fc_init = nn.initializers.normal(0.01)


class VGGStage(nn.Module):
    channels: Sequence[int]
    batch_norm: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        for i, channels in enumerate(self.channels):
            x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=CONV_INIT, dtype=self.dtype,
                        name=f"conv{i}")(x)
            if self.batch_norm:
                x = TORCH_NORM(x, train, self.dtype, f"bn{i}")
            x = nn.relu(x)
        return max_pool(x, 2, 2)


class VGGFC(nn.Module):
    """Adaptive average pool to 7x7, flatten in PyTorch's (C, H, W) order, fc6 and fc7 with ReLU and dropout."""

    width: int = 4096
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = adaptive_avg_pool(x, 7)
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        for name in ("fc6", "fc7"):
            x = nn.relu(nn.Dense(self.width, kernel_init=_fc_init, dtype=self.dtype, name=name)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return x


class VGG(nn.Module):
    """VGG backbone: `__call__(images, train)` returns `{stage1..stage5, pre_logits}`.

    Attributes:
      depth: 11, 13, 16 or 19.
      batch_norm: the `_bn` variants.
      width_divisor: tests shrink every channel count (and fc6/fc7) by this factor.
      dropout_rate: dropout after fc6 and fc7 (train only), 0.5 as in the original.
    """

    depth: int = 16
    batch_norm: bool = False
    width_divisor: int = 1
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    groups = (*(stage(i) for i in range(1, 6)), "fc")
    features = (*(stage(i) for i in range(1, 6)), PRE_LOGITS)

    @property
    def stages(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(c // self.width_divisor for c in convs) for convs in CONFIGS[self.depth])

    @property
    def feature_channels(self) -> dict[str, int]:
        return {stage(i + 1): convs[-1] for i, convs in enumerate(self.stages)} | {
            PRE_LOGITS: 4096 // self.width_divisor}

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        out = {}
        for i, channels in enumerate(self.stages):
            x = out[stage(i + 1)] = VGGStage(channels, self.batch_norm, self.dtype, name=stage(i + 1))(x, train)
        out[PRE_LOGITS] = VGGFC(4096 // self.width_divisor, self.dropout_rate, self.dtype, name="fc")(x, train)
        return out


# torchvision's files: (sha256 prefix, ImageNet top-1) without and with BatchNorm
_TORCHVISION = {11: (("8a719046", 69.020), ("6002323d", 70.370)), 13: (("19584684", 69.928), ("abd245e5", 71.586)),
                16: (("397923af", 71.592), ("6c64b313", 73.360)), 19: (("dcbb9e9d", 72.376), ("c79401a0", 74.218))}
for _depth, _files in _TORCHVISION.items():
    for _bn, _file in zip(("", "_bn"), _files):
        register_model(ModelSpec(f"vgg{_depth}{_bn}", "vgg", functools.partial(VGG, depth=_depth, batch_norm=bool(_bn)),
                                 f"vgg{_depth}{_bn}.tv_in1k", 224))
        register_weights(*torchvision_weights(f"vgg{_depth}{_bn}", tv_in1k=_file))
