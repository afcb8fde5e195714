"""The inverted-residual block (MobileNetV2's; EfficientNet's MBConv without squeeze-excite) and a group of them,
shared by MobileNetV2 and EfficientNet-Lite, which differ only in their settings: kernel sizes, padding ("SAME"
for the TF-trained Lite, "SYMMETRIC" for PyTorch's MobileNetV2), BatchNorm constants and channel counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxtl.models.layers import CONV_INIT, DepthwiseConv, Norm, conv, drop_path, rematerialised


@dataclass(frozen=True)
class BlockSpec:
    """One block: its index in the family's own numbering (its name is `block<index>`), depthwise kernel and
    stride, expansion ratio, channels in and out, and stochastic-depth rate."""

    index: int
    kernel: int
    stride: int
    expand_ratio: int
    in_features: int
    out_features: int
    drop_path_rate: float = 0.0


class InvertedResidual(nn.Module):
    """1x1 expand (unless the expansion ratio is 1), kxk depthwise, 1x1 linear project, ReLU6 after the first two;
    an identity skip (with stochastic depth) when the shapes allow."""

    spec: BlockSpec
    padding: str
    norm: Norm
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        inputs, dt, norm, b = x, self.dtype, self.norm, self.spec
        if b.expand_ratio != 1:
            hidden = int(round(b.in_features * b.expand_ratio))
            x = nn.relu6(norm(conv(hidden, 1, 1, self.padding, dt, "expand_conv")(x), train, dt, "expand_bn"))
        dw_conv = DepthwiseConv(b.kernel, b.stride, self.padding, kernel_init=CONV_INIT, dtype=dt, name="dw_conv")
        x = nn.relu6(norm(dw_conv(x), train, dt, "dw_bn"))
        x = norm(conv(b.out_features, 1, 1, self.padding, dt, "project_conv")(x), train, dt, "project_bn")
        if b.stride == 1 and b.in_features == b.out_features:
            x = drop_path(self, x, b.drop_path_rate, train) + inputs
        return x


class InvertedResidualGroup(nn.Module):
    """One layer group: an optional 3x3/2 stem conv, a run of blocks, an optional 1x1 head conv (both with
    BatchNorm and ReLU6)."""

    blocks: Sequence[BlockSpec]
    padding: str
    norm: Norm
    stem_features: int = 0
    head_features: int = 0
    remat: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        dt, norm = self.dtype, self.norm
        if self.stem_features:
            x = nn.relu6(norm(conv(self.stem_features, 3, 2, self.padding, dt, "conv")(x), train, dt, "bn"))
        block = rematerialised(InvertedResidual, self.remat)
        for spec in self.blocks:
            x = block(spec, self.padding, norm, dt, name=f"block{spec.index}")(x, train)
        if self.head_features:
            x = nn.relu6(norm(conv(self.head_features, 1, 1, self.padding, dt, "head_conv")(x), train, dt, "head_bn"))
        return x
