"""The registry of backbone variants and their pretrained weights, timm-style: each family's file registers its
variants (`register_model`) and their weights (`register_weights`) next to the model; `jaxtl.models` imports every
family, so importing anything from `jaxtl.models` fills both registries.

A weights entry is `<model>.<tag>` with its source (a URL, a pip package, or the Hugging Face hub), the sha256 its
publisher gives (or None: recorded at first download), and the `Preprocessing` it was trained with.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import flax.linen as nn

from jaxtl.core.errors import ConfigError
from jaxtl.core.preprocessing import Preprocessing


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of jaxtl needs to know about a variant.

    family: selects the weight converter ("resnet", "efficientnet_lite", "vgg", "mobilenet_v2", "vit").
    build: returns the backbone module; keyword arguments (dtype, width, drop_path_rate, ...) pass through.
    default_weights: the pretrained weights id used when a caller asks for "the pretrained model".
    input_size: the resolution the variant was designed for.
    head_dropout: dropout before the classifier that the variant was trained with (the head's default).
    preprocessing: what weights of this variant from a file expect, when it has no registered default weights
      to take it from (None: ImageNet mean/std, bilinear, at `input_size`).
    """

    name: str
    family: str
    build: Callable[..., nn.Module]
    default_weights: str | None
    input_size: int
    head_dropout: float = 0.0
    preprocessing: Preprocessing | None = None


@dataclass(frozen=True)
class PretrainedWeights:
    """One pretrained weight file.

    id: `<model>.<tag>`, e.g. `resnet50.tv2_in1k`.
    model: the registered model variant it fits.
    sha256: the file's sha256, the prefix its publisher checks (torchvision), or None (recorded at first download).
    url: where to download it from, or None; hub: the Hugging Face hub repository it is at.
    pip_package, pip_module, package_path: a pip package that carries the file, the module to import to find
      it, and the file's path inside that module's folder.
    num_classes: classes of the checkpoint's head (0: a headless file).
    """

    id: str
    model: str
    sha256: str | None
    preprocessing: Preprocessing
    url: str | None = None
    hub: str | None = None
    pip_package: str | None = None
    pip_module: str | None = None
    package_path: str | None = None
    num_classes: int = 1000
    description: str = ""

    @property
    def filename(self) -> str:
        if self.hub:  # every hub repository calls its file model.safetensors
            return f"{self.id}.safetensors"
        if self.url:
            return self.url.rsplit("/", 1)[-1]
        return self.package_path.rsplit("/", 1)[-1]


MODELS: dict[str, ModelSpec] = {}
WEIGHTS: dict[str, PretrainedWeights] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODELS:
        raise ValueError(f"model '{spec.name}' is registered twice")
    MODELS[spec.name] = spec
    return spec


def register_weights(*entries: PretrainedWeights) -> None:
    for entry in entries:
        if entry.id in WEIGHTS:
            raise ValueError(f"weights '{entry.id}' are registered twice")
        WEIGHTS[entry.id] = entry


# ---- where published weights come from ----

TORCHVISION_URL = "https://download.pytorch.org/models/"
TORCHVISION_V1 = Preprocessing(input_size=224, crop_fraction=224 / 256, interpolation="bilinear")
TORCHVISION_V2 = Preprocessing(input_size=224, crop_fraction=224 / 232, interpolation="bilinear")


def torchvision_weights(model: str, **tags: tuple[str, float]) -> list[PretrainedWeights]:
    """torchvision's files of `model`, `tag=(sha256 prefix, ImageNet top-1)`: `tv_in1k` (the original recipe,
    resize 256 for a 224 crop) and `tv2_in1k` (the 2021 recipe, resize 232). torchvision publishes the first 8 hex
    digits of each file's sha256 in its name and checks only those (`check_hash=True`); the entry carries that
    prefix."""
    preps = {"tv_in1k": TORCHVISION_V1, "tv2_in1k": TORCHVISION_V2}
    return [PretrainedWeights(id=f"{model}.{tag}", model=model, sha256=prefix, preprocessing=preps[tag],
                              url=f"{TORCHVISION_URL}{model}-{prefix}.pth",
                              description=f"torchvision ImageNet-1k weights ({tag}), top-1 {top1}")
            for tag, (prefix, top1) in tags.items()]


def timm_hub_weights(model: str, tag: str, timm_name: str, prep: Preprocessing, description: str
                     ) -> PretrainedWeights:
    """A timm file on the Hugging Face hub; hub files have no published hash (recorded at first download)."""
    hub = f"timm/{timm_name}"
    return PretrainedWeights(id=f"{model}.{tag}", model=model, sha256=None, preprocessing=prep, hub=hub,
                             url=f"https://huggingface.co/{hub}/resolve/main/model.safetensors",
                             description=f"timm {timm_name}: {description}")


# ---- looking things up ----

def get_model_spec(name: str) -> ModelSpec:
    """The spec of a registered variant; an unknown name is an error listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(MODELS)}") from None


def get_weights_entry(weights_id: str) -> PretrainedWeights:
    try:
        return WEIGHTS[weights_id]
    except KeyError:
        raise ConfigError(f"unknown weights id '{weights_id}'; registered: {', '.join(WEIGHTS)}") from None


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


def parse_models(specs: Sequence[str]) -> list[tuple[str, str | None]]:
    """`transfer.auto_models` entries as `(model name, weights)`: `NAME` takes the variant's registered weights
    (`default`), `NAME=WEIGHTS` a registered id, a file, `hf-hub:REPO`, or `none` (random init, a baseline)."""
    parsed = []
    for spec in specs:
        name, _, weights = str(spec).partition("=")
        if name not in MODELS:
            raise ConfigError(f"transfer.auto_models: {name!r} is not a registered model; choose from "
                              f"{', '.join(sorted(MODELS))}")
        parsed.append((name, None if weights.lower() == "none" else (weights or "default")))
    if len(set(parsed)) != len(parsed):
        raise ConfigError(f"transfer.auto_models={tuple(specs)!r} names a backbone twice; list each once")
    return parsed
