"""VGG-11/13/16/19 backbones, with or without BatchNorm, in torchvision's layout.

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

from jaxtl.models.layers import adaptive_avg_pool, batch_norm

# Convs per stage and their channels, as in the paper's configurations A, B, D, E.
STAGES = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's kaiming_normal_(fan_out)
_fc_init = nn.initializers.normal(0.01)


class VGGStage(nn.Module):
    channels: Sequence[int]
    batch_norm: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        for i, channels in enumerate(self.channels):
            x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_conv_init, dtype=self.dtype,
                        name=f"conv{i}")(x)
            if self.batch_norm:
                x = batch_norm(0.9, 1e-5, self.dtype, f"bn{i}")(x, use_running_average=not train)
            x = nn.relu(x)
        return nn.max_pool(x, (2, 2), (2, 2))


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

    groups = ("stage1", "stage2", "stage3", "stage4", "stage5", "fc")
    features = ("stage1", "stage2", "stage3", "stage4", "stage5", "pre_logits")

    @property
    def stages(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(c // self.width_divisor for c in stage) for stage in STAGES[self.depth])

    @property
    def feature_channels(self) -> dict[str, int]:
        return {f"stage{i + 1}": stage[-1] for i, stage in enumerate(self.stages)} | {
            "pre_logits": 4096 // self.width_divisor}

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        out = {}
        for i, channels in enumerate(self.stages):
            x = out[f"stage{i + 1}"] = VGGStage(channels, self.batch_norm, self.dtype, name=f"stage{i + 1}")(x, train)
        out["pre_logits"] = VGGFC(4096 // self.width_divisor, self.dropout_rate, self.dtype, name="fc")(x, train)
        return out


VGG11 = functools.partial(VGG, depth=11)
VGG13 = functools.partial(VGG, depth=13)
VGG16 = functools.partial(VGG, depth=16)
VGG19 = functools.partial(VGG, depth=19)
