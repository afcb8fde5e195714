"""PyTorch state dicts -> Flax variables (`params` and `batch_stats`).

The Flax variable tree drives the conversion: every Flax leaf is looked up under the torch name its module maps
to, transposed (conv OIHW -> HWIO, linear (out, in) -> (in, out)) and shape-checked. Every problem (missing key,
unexpected key, wrong shape) is collected and reported in one `WeightsMismatchError`.

Torch layouts understood:
- `torchvision`: torchvision's (and timm's) ResNet names: conv1, bn1, layer1.0.conv1, ..., fc.
- `ml_illustrated`: the EfficientNet-Lite port in `efficientnet-lite-pytorch` and its weight packages:
  _conv_stem, _bn0, _blocks.N._expand_conv, ..., _conv_head, _bn1, _fc.
- `timm_efficientnet`: timm's `tf_efficientnet_lite*`: conv_stem, bn1, blocks.R.J.conv_pw, ..., conv_head, bn2,
  classifier.
"""

from __future__ import annotations

from typing import Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jaxtl.models import efficientnet_lite
from jaxtl.models.registry import get_model_spec

# Torch leaf name for each Flax leaf name, per collection.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED_TORCH_LEAVES = ("num_batches_tracked",)

# A key whose presence identifies each layout, per family, in order of preference.
_LAYOUT_MARKERS = {
    "resnet": (("torchvision", "conv1.weight"),),
    "efficientnet_lite": (("ml_illustrated", "_conv_stem.weight"), ("timm_efficientnet", "conv_stem.weight")),
}


class WeightsMismatchError(ValueError):
    """A state dict does not fit the model: missing, unexpected or wrongly shaped tensors."""


def _torchvision_resnet(path: tuple[str, ...]) -> str:
    head, *rest = path
    if head == "stem":
        return {"conv": "conv1", "bn": "bn1"}[rest[0]]
    if head == "head":
        return "fc"
    stage, block, layer = int(head.removeprefix("stage")), int(rest[0].removeprefix("block")), rest[1]
    layer = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(layer, layer)
    return f"layer{stage}.{block}.{layer}"


_ML_ILLUSTRATED_BLOCK = {
    "expand_conv": "_expand_conv", "expand_bn": "_bn0", "dw_conv": "_depthwise_conv", "dw_bn": "_bn1",
    "project_conv": "_project_conv", "project_bn": "_bn2",
}
_ML_ILLUSTRATED_GROUP = {"conv": "_conv_stem", "bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1"}


def _ml_illustrated_lite(path: tuple[str, ...]) -> str:
    if path[0] == "head":
        return "_fc"
    if path[1].startswith("block"):
        return f"_blocks.{path[1].removeprefix('block')}.{_ML_ILLUSTRATED_BLOCK[path[2]]}"
    return _ML_ILLUSTRATED_GROUP[path[1]]


def _timm_lite(depth: float) -> Callable[[tuple[str, ...]], str]:
    starts = efficientnet_lite._run_starts(depth)

    def name(path: tuple[str, ...]) -> str:
        if path[0] == "head":
            return "classifier"
        if not path[1].startswith("block"):
            return {"conv": "conv_stem", "bn": "bn1", "head_conv": "conv_head", "head_bn": "bn2"}[path[1]]
        index = int(path[1].removeprefix("block"))
        run = max(r for r, start in enumerate(starts[:-1]) if start <= index)
        if run == 0:  # timm's depthwise-separable first block has no expansion conv
            layer = {"dw_conv": "conv_dw", "dw_bn": "bn1", "project_conv": "conv_pw", "project_bn": "bn2"}[path[2]]
        else:
            layer = {
                "expand_conv": "conv_pw", "expand_bn": "bn1", "dw_conv": "conv_dw", "dw_bn": "bn2",
                "project_conv": "conv_pwl", "project_bn": "bn3",
            }[path[2]]
        return f"blocks.{run}.{index - starts[run]}.{layer}"

    return name


def _name_map(layout: str, model: nn.Module) -> Callable[[tuple[str, ...]], str]:
    if layout == "torchvision":
        return _torchvision_resnet
    if layout == "ml_illustrated":
        return _ml_illustrated_lite
    if layout == "timm_efficientnet":
        return _timm_lite(model.depth)
    raise ValueError(f"unknown torch layout '{layout}'")


def detect_layout(state_dict: Mapping[str, np.ndarray], model_name: str, source: str) -> str:
    """The torch layout of `state_dict`, recognised by a key each layout has; an error if none fits."""
    family = get_model_spec(model_name).family
    for layout, marker in _LAYOUT_MARKERS[family]:
        if marker in state_dict:
            return layout
    expected = " or ".join(repr(marker) for _, marker in _LAYOUT_MARKERS[family])
    raise WeightsMismatchError(
        f"{source} does not look like {model_name} weights: it has no {expected} "
        f"(first keys: {list(state_dict)[:5]}). Pass weights saved from the matching model."
    )


def _to_flax(array: np.ndarray, flax_leaf: str) -> np.ndarray:
    if flax_leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO; depthwise (C,1,k,k) -> (k,k,1,C)
    if flax_leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model: nn.Module,
    model_name: str,
    input_shape: tuple[int, ...] = (1, 64, 64, 3),
    skip_groups: tuple[str, ...] = (),
    source: str = "state dict",
) -> dict:
    """Flax variables for `model` from a torch state dict (layout detected from its keys).

    `skip_groups` names top-level layer groups (e.g. `("head",)`) left out of the result and not expected in the
    file; their torch tensors are ignored. Returns `{"params": ..., "batch_stats": ...}` of NumPy float32 arrays.
    Raises `WeightsMismatchError` listing every missing, unexpected and wrongly shaped tensor.
    """
    layout = detect_layout(state_dict, model_name, source)
    torch_name = _name_map(layout, model)
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros(input_shape, np.float32)))
    flat_target = traverse_util.flatten_dict(dict(target))

    converted, used, missing, wrong_shape = {}, set(), [], []
    skipped_prefixes = set()
    for path, spec in flat_target.items():
        collection, *module_path, leaf = path
        prefix = torch_name(tuple(module_path))
        if module_path[0] in skip_groups:
            skipped_prefixes.add(prefix)
            continue
        key = f"{prefix}.{_LEAF_NAMES[(collection, leaf)]}"
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        value = _to_flax(np.asarray(state_dict[key]), leaf)
        if value.shape != tuple(spec.shape):
            wrong_shape.append(f"{key}: file {tuple(state_dict[key].shape)}, model expects {tuple(spec.shape)} (Flax)")
            continue
        converted[path] = value.astype(np.float32)

    unexpected = [
        k for k in state_dict
        if k not in used
        and k.rsplit(".", 1)[-1] not in _IGNORED_TORCH_LEAVES
        and k.rsplit(".", 1)[0] not in skipped_prefixes
    ]
    if missing or unexpected or wrong_shape:
        raise WeightsMismatchError(_mismatch_message(source, model_name, layout, missing, unexpected, wrong_shape))
    return traverse_util.unflatten_dict(converted)


def _mismatch_message(source, model_name, layout, missing, unexpected, wrong_shape, shown: int = 8) -> str:
    lines = [f"{source} does not fit {model_name} ({layout} layout):"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            more = f" ... and {len(items) - shown} more" if len(items) > shown else ""
            lines.append(f"  {len(items)} {title}: {', '.join(items[:shown])}{more}")
    lines.append("Check that the file was saved from the same model variant (e.g. resnet50 weights for resnet50).")
    return "\n".join(lines)

