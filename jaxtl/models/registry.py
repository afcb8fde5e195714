"""Named backbone variants: ResNet-18..152, EfficientNet-Lite0..4, VGG-11..19 (and `_bn`), MobileNetV2, ViT-Ti/S/B."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import flax.linen as nn

from jaxtl.errors import ConfigError
from jaxtl.models import efficientnet_lite, mobilenet_v2, resnet, vgg, vit


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of jaxtl needs to know about a variant.

    family: selects the weight converter ("resnet", "efficientnet_lite", "vgg", "mobilenet_v2", "vit").
    build: returns the backbone module; keyword arguments (dtype, width, drop_path_rate, ...) pass through.
    default_weights: the pretrained weights id used when a caller asks for "the pretrained model".
    input_size: the resolution the variant was designed for.
    head_dropout: dropout before the classifier that the variant was trained with (the head's default).
    """

    name: str
    family: str
    build: Callable[..., nn.Module]
    default_weights: str | None
    input_size: int
    head_dropout: float = 0.0


_SPECS = (
    ModelSpec("resnet18", "resnet", resnet.ResNet18, "resnet18.tv_in1k", 224),
    ModelSpec("resnet34", "resnet", resnet.ResNet34, "resnet34.tv_in1k", 224),
    ModelSpec("resnet50", "resnet", resnet.ResNet50, "resnet50.tv2_in1k", 224),
    ModelSpec("resnet101", "resnet", resnet.ResNet101, "resnet101.tv2_in1k", 224),
    ModelSpec("resnet152", "resnet", resnet.ResNet152, "resnet152.tv2_in1k", 224),
    ModelSpec("efficientnet_lite0", "efficientnet_lite", efficientnet_lite.EfficientNetLite0,
              "efficientnet_lite0.in1k", 224, 0.2),
    ModelSpec("efficientnet_lite1", "efficientnet_lite", efficientnet_lite.EfficientNetLite1,
              "efficientnet_lite1.in1k", 240, 0.2),
    ModelSpec("efficientnet_lite2", "efficientnet_lite", efficientnet_lite.EfficientNetLite2,
              "efficientnet_lite2.in1k", 260, 0.3),
    ModelSpec("efficientnet_lite3", "efficientnet_lite", efficientnet_lite.EfficientNetLite3,
              "efficientnet_lite3.in1k", 280, 0.3),
    ModelSpec("efficientnet_lite4", "efficientnet_lite", efficientnet_lite.EfficientNetLite4,
              "efficientnet_lite4.in1k", 300, 0.3),
    *(ModelSpec(f"vgg{depth}{bn}", "vgg", functools.partial(vgg.VGG, depth=depth, batch_norm=bool(bn)),
                f"vgg{depth}{bn}.tv_in1k", 224) for depth in (11, 13, 16, 19) for bn in ("", "_bn")),
    ModelSpec("mobilenet_v2", "mobilenet_v2", mobilenet_v2.MobileNetV2, "mobilenet_v2.deepsort_in1k", 224, 0.2),
    ModelSpec("vit_ti16", "vit", vit.ViT_Ti16, "vit_ti16.augreg_in21k_ft_in1k", 224),
    ModelSpec("vit_s16", "vit", vit.ViT_S16, "vit_s16.augreg_in21k_ft_in1k", 224),
    ModelSpec("vit_b16", "vit", vit.ViT_B16, "vit_b16.augreg_in21k_ft_in1k", 224),
    ModelSpec("vit_b32", "vit", vit.ViT_B32, "vit_b32.augreg_in21k_ft_in1k", 224),
)
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}

# Tiny variants for tests: the real topology at a fraction of the width.
TinyResNet = functools.partial(resnet.ResNet, stage_sizes=(1, 1, 1, 1), block_cls=resnet.BasicBlock, width=8)
TinyEfficientNetLite = functools.partial(efficientnet_lite.EfficientNetLite, width_divisor=8)
TinyVGG = functools.partial(vgg.VGG, depth=11, batch_norm=True, width_divisor=16)
TinyMobileNetV2 = functools.partial(mobilenet_v2.MobileNetV2, width=0.25)
TinyViT = functools.partial(vit.VisionTransformer, patch_size=8, dim=16, depth=4, heads=2, mlp_dim=32, image_size=32)


def get_model_spec(name: str) -> ModelSpec:
    """The spec of a registered variant; an unknown name is an error listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(MODELS)}") from None


def build_arguments(name: str) -> tuple[str, ...]:
    """The build arguments a variant's backbone takes (its module attributes, less those the variant fixes)."""
    build = get_model_spec(name).build
    fixed = set(build.keywords) if isinstance(build, functools.partial) else set()
    module = build.func if isinstance(build, functools.partial) else build
    return tuple(f.name for f in dataclasses.fields(module) if f.name not in fixed | {"parent", "name"})


def build_backbone(name: str, **kwargs) -> nn.Module:
    """The backbone module of a registered variant; a build argument it does not take is an error naming it."""
    known = build_arguments(name)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(f"model.kwargs {unknown}: {name} does not take {'it' if len(unknown) == 1 else 'them'}; "
                          f"its build arguments are {', '.join(k for k in known if k != 'dtype')}")
    return get_model_spec(name).build(**kwargs)
