"""PyTorch state dicts -> Flax variables (`params` and `batch_stats`) of a backbone and, optionally, its
pretrained linear head.

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

from jaxtl.errors import JaxtlError
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


class WeightsMismatchError(JaxtlError, ValueError):
    """A state dict does not fit the model: missing, unexpected or wrongly shaped tensors."""


# The torch name of the pretrained linear classifier, per layout.
_HEAD_NAMES = {"torchvision": "fc", "ml_illustrated": "_fc", "timm_efficientnet": "classifier"}


def _torchvision_resnet(path: tuple[str, ...]) -> str:
    head, *rest = path
    if head == "stem":
        return {"conv": "conv1", "bn": "bn1"}[rest[0]]
    stage, block, layer = int(head.removeprefix("stage")), int(rest[0].removeprefix("block")), rest[1]
    layer = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(layer, layer)
    return f"layer{stage}.{block}.{layer}"


_ML_ILLUSTRATED_BLOCK = {
    "expand_conv": "_expand_conv", "expand_bn": "_bn0", "dw_conv": "_depthwise_conv", "dw_bn": "_bn1",
    "project_conv": "_project_conv", "project_bn": "_bn2",
}
_ML_ILLUSTRATED_GROUP = {"conv": "_conv_stem", "bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1"}


def _ml_illustrated_lite(path: tuple[str, ...]) -> str:
    if path[1].startswith("block"):
        return f"_blocks.{path[1].removeprefix('block')}.{_ML_ILLUSTRATED_BLOCK[path[2]]}"
    return _ML_ILLUSTRATED_GROUP[path[1]]


def _timm_lite(depth: float) -> Callable[[tuple[str, ...]], str]:
    starts = efficientnet_lite._run_starts(depth)

    def name(path: tuple[str, ...]) -> str:
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


def _name_map(layout: str, backbone: nn.Module) -> Callable[[tuple[str, ...]], str]:
    if layout == "torchvision":
        return _torchvision_resnet
    if layout == "ml_illustrated":
        return _ml_illustrated_lite
    if layout == "timm_efficientnet":
        return _timm_lite(backbone.depth)
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


def checkpoint_classes(state_dict: Mapping[str, np.ndarray], model_name: str, source: str) -> int:
    """Classes of the file's linear classifier; 0 for a headless (backbone-only) file."""
    bias = f"{_HEAD_NAMES[detect_layout(state_dict, model_name, source)]}.bias"
    return int(np.shape(state_dict[bias])[0]) if bias in state_dict else 0


def _to_flax(array: np.ndarray, flax_leaf: str) -> np.ndarray:
    if flax_leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO; depthwise (C,1,k,k) -> (k,k,1,C)
    if flax_leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    backbone: nn.Module,
    model_name: str,
    *,
    with_head: bool = False,
    input_shape: tuple[int, ...] = (1, 64, 64, 3),
    source: str = "state dict",
) -> dict:
    """`Classifier`-shaped variables from a torch state dict (layout detected from its keys):
    `{"params": {"backbone": ..., "head": {"fc": ...}}, "batch_stats": {"backbone": ...}}`, NumPy float32.

    With `with_head=False` the file's classifier (if any) is ignored and `params` has no `head`; with it, the
    file must have one. Raises `WeightsMismatchError` listing every missing, unexpected and wrongly shaped tensor.
    """
    layout = detect_layout(state_dict, model_name, source)
    torch_name = _name_map(layout, backbone)
    target = jax.eval_shape(lambda: backbone.init(jax.random.key(0), np.zeros(input_shape, np.float32)))
    expected = {}  # torch key -> (flax path, flax leaf, shape)
    for (collection, *module_path, leaf), spec in traverse_util.flatten_dict(dict(target)).items():
        key = f"{torch_name(tuple(module_path))}.{_LEAF_NAMES[(collection, leaf)]}"
        expected[key] = ((collection, "backbone", *module_path, leaf), leaf, tuple(spec.shape))
    head = _HEAD_NAMES[layout]
    if with_head:
        weight = state_dict.get(f"{head}.weight")
        classes = np.shape(weight)[0] if weight is not None else 0
        width = backbone.feature_channels["pre_logits"]
        expected[f"{head}.weight"] = (("params", "head", "fc", "kernel"), "kernel", (width, classes))
        expected[f"{head}.bias"] = (("params", "head", "fc", "bias"), "bias", (classes,))

    converted, missing, wrong_shape = {}, [], []
    for key, (path, leaf, shape) in expected.items():
        if key not in state_dict:
            missing.append(key)
            continue
        value = _to_flax(np.asarray(state_dict[key]), leaf)
        if value.shape != shape:
            wrong_shape.append(f"{key}: file {tuple(state_dict[key].shape)}, model expects {shape} (Flax)")
            continue
        converted[path] = value.astype(np.float32)
    unexpected = [
        k for k in state_dict
        if k not in expected
        and k.rsplit(".", 1)[-1] not in _IGNORED_TORCH_LEAVES
        and k.rsplit(".", 1)[0] != head
    ]
    if missing or unexpected or wrong_shape:
        raise WeightsMismatchError(_mismatch_message(source, model_name, layout, missing, unexpected, wrong_shape))
    return traverse_util.unflatten_dict(converted)


def _mismatch_message(source, model_name, layout, missing, unexpected, wrong_shape, shown: int = 8) -> str:
    """One line: every kind of mismatch with its count and the first few names."""
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            more = f" ... and {len(items) - shown} more" if len(items) > shown else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:shown])}{more}")
    return (f"{source} does not fit {model_name} ({layout} layout): {'; '.join(parts)}. Check that the file was saved "
            "from the same model variant (e.g. resnet50 weights for resnet50).")
