"""Named model variants: `resnet18` ... `resnet152`, `efficientnet_lite0` ... `efficientnet_lite4`."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import flax.linen as nn

from jaxtl.models import efficientnet_lite, resnet


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of jaxtl needs to know about a variant.

    family: selects the weight converter and the layer-group conventions ("resnet" or "efficientnet_lite").
    build: returns the Flax module; keyword arguments (num_classes, dtype, ...) pass through.
    default_weights: the pretrained weights id used when a caller asks for "the pretrained model".
    input_size: the resolution the variant was designed for.
    """

    name: str
    family: str
    build: Callable[..., nn.Module]
    default_weights: str | None
    input_size: int


_SPECS = (
    ModelSpec("resnet18", "resnet", resnet.ResNet18, "resnet18.tv_in1k", 224),
    ModelSpec("resnet34", "resnet", resnet.ResNet34, "resnet34.tv_in1k", 224),
    ModelSpec("resnet50", "resnet", resnet.ResNet50, "resnet50.tv2_in1k", 224),
    ModelSpec("resnet101", "resnet", resnet.ResNet101, "resnet101.tv2_in1k", 224),
    ModelSpec("resnet152", "resnet", resnet.ResNet152, "resnet152.tv2_in1k", 224),
    ModelSpec("efficientnet_lite0", "efficientnet_lite", efficientnet_lite.EfficientNetLite0, "efficientnet_lite0.in1k", 224),
    ModelSpec("efficientnet_lite1", "efficientnet_lite", efficientnet_lite.EfficientNetLite1, "efficientnet_lite1.in1k", 240),
    ModelSpec("efficientnet_lite2", "efficientnet_lite", efficientnet_lite.EfficientNetLite2, "efficientnet_lite2.in1k", 260),
    ModelSpec("efficientnet_lite3", "efficientnet_lite", efficientnet_lite.EfficientNetLite3, "efficientnet_lite3.in1k", 280),
    ModelSpec("efficientnet_lite4", "efficientnet_lite", efficientnet_lite.EfficientNetLite4, "efficientnet_lite4.in1k", 300),
)
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}

# Tiny variants for tests: the real topology at a fraction of the width.
TinyResNet = functools.partial(resnet.ResNet, stage_sizes=(1, 1, 1, 1), block_cls=resnet.BasicBlock, width=8)
TinyEfficientNetLite = functools.partial(efficientnet_lite.EfficientNetLite, width_divisor=8)


def get_model_spec(name: str) -> ModelSpec:
    """The spec of a registered variant; an unknown name is an error listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(MODELS)}") from None
