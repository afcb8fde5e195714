"""`create_model` and `create_backbone`: a registered variant, optionally with pretrained weights, as
`(module, variables)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtl.data.preprocess import Preprocessing
from jaxtl.errors import ConfigError, MissingFileError
from jaxtl.models.classifier import DEFAULT_HEAD_LAYERS, Classifier, Head, init_variables
from jaxtl.models.registry import build_backbone, get_model_spec
from jaxtl.rules import match_patterns, path_of, tree_paths
from jaxtl.weights.convert import checkpoint_classes, convert_state_dict
from jaxtl.weights.files import read_state_dict, weights_file
from jaxtl.weights.registry import PretrainedWeights, get_weights_entry, is_weights_id

DEFAULT_WEIGHTS = "default"  # the variant's registered default weights


def resolve_weights(model_name: str, weights: str | Path | None) -> PretrainedWeights | Path | None:
    """A registry entry for an id (or "default"), a Path for a local file, None for random init."""
    if weights is None:
        return None
    weights = str(weights)
    if weights == DEFAULT_WEIGHTS:
        default = get_model_spec(model_name).default_weights
        if default is None:
            raise ConfigError(f"model '{model_name}' has no registered pretrained weights; pass a weights file path")
        weights = default
    if is_weights_id(weights):
        entry = get_weights_entry(weights)
        if entry.model != model_name:
            raise ConfigError(f"weights '{entry.id}' are for model '{entry.model}', not '{model_name}'")
        return entry
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingFileError(
            f"weights '{weights}' is neither a registered weights id for {model_name} nor an existing file; "
            f"use 'default', a file path, or one of the ids in jaxtl.weights.registry.WEIGHTS"
        )
    return path


def get_preprocessing(model_name: str, weights: str | Path | None = DEFAULT_WEIGHTS) -> Preprocessing:
    """The evaluation preprocessing of the weights; for a local file or random init, the variant's default."""
    spec = get_model_spec(model_name)
    if weights == DEFAULT_WEIGHTS:
        weights = spec.default_weights
    resolved = resolve_weights(model_name, weights)
    if isinstance(resolved, PretrainedWeights):
        return resolved.preprocessing
    if spec.default_weights:
        return get_weights_entry(spec.default_weights).preprocessing
    return Preprocessing(input_size=spec.input_size)


def _state_dict(model_name: str, resolved: PretrainedWeights | Path) -> tuple[dict, str]:
    path = weights_file(resolved) if isinstance(resolved, PretrainedWeights) else resolved
    return read_state_dict(path), str(path)


def classifier_classes(name: str, weights: str | Path | None) -> int:
    """Classes of the pretrained classifier in the weights file; 0 for a headless file (or no weights)."""
    resolved = resolve_weights(name, weights)
    if resolved is None:
        return 0
    state_dict, source = _state_dict(name, resolved)
    return checkpoint_classes(state_dict, name, source)


def create_backbone(name: str, weights: str | Path | None = None, *, rng: int | jax.Array = 0,
                    dtype: Any = jnp.float32, **kwargs) -> tuple[nn.Module, dict]:
    """A backbone alone (named features, no head) and its variables; `weights` as for `create_model`."""
    backbone = build_backbone(name, dtype=dtype, **kwargs)
    resolved = resolve_weights(name, weights)
    if resolved is None:
        key = jax.random.key(rng) if isinstance(rng, int) else rng
        return backbone, init_variables(backbone, key)
    state_dict, source = _state_dict(name, resolved)
    converted = convert_state_dict(state_dict, backbone, name, source=source)
    return backbone, jax.tree_util.tree_map(jnp.asarray, {c: v["backbone"] for c, v in converted.items()})


def create_model(
    name: str,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    *,
    rng: int | jax.Array = 0,
    dtype: Any = jnp.float32,
    head_layers: Sequence[str] = DEFAULT_HEAD_LAYERS,
    head_hidden: int = 0,
    head_dropout: float | None = None,
    reinit: Sequence[str] = (),
    **backbone_kwargs,
) -> tuple[Classifier, dict]:
    """A `Classifier` (backbone + head) of a registered variant and its variables.

    Args:
      name: a registered variant (`jaxtl.models.registry.MODELS`), e.g. "resnet50", "efficientnet_lite0".
      weights: None for random init, a registered id (e.g. "resnet50.tv2_in1k"), "default" for the variant's
        default weights, or a local `.pth`/`.safetensors` path.
      num_classes: head width; None keeps the file's classifier (1000 for random init). A head other than the
        file's own linear one over `pre_logits` (other width, layers or hidden units) is freshly initialised;
        the backbone is always loaded.
      rng: seed or key for random initialisation (of the whole model, or of what is not loaded).
      dtype: computation dtype (parameters stay float32).
      head_layers: the backbone features the head reads, pooled and concatenated (default `("pre_logits",)`).
      head_hidden: 0 for a linear head, else the hidden width of an MLP head.
      head_dropout: dropout before the classifier; None for the variant's own (0.2 for EfficientNet-Lite0).
      reinit: regexes over parameter paths (`backbone/stage4/.*`) initialised afresh instead of loaded
        (big_vision's `dont_load`); one that matches nothing is an error.
      backbone_kwargs: build arguments of the backbone (e.g. `drop_path_rate`, `width` for tiny test models).

    Returns:
      `(model, variables)`; `logits, features = model.apply(variables, images)` for NHWC images preprocessed as
      `get_preprocessing(name, weights)` says.
    """
    spec = get_model_spec(name)
    backbone = build_backbone(name, dtype=dtype, **backbone_kwargs)
    resolved = resolve_weights(name, weights)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    head_dropout = spec.head_dropout if head_dropout is None else head_dropout
    state_dict = source = None
    file_classes = 1000
    if resolved is not None:
        state_dict, source = _state_dict(name, resolved)
        file_classes = checkpoint_classes(state_dict, name, source)
    num_classes = file_classes if num_classes is None else num_classes
    if num_classes < 1:
        raise ConfigError(f"{source or name} has no classifier: give num_classes, or use create_backbone")
    model = Classifier(backbone, num_classes, tuple(head_layers), head_hidden, head_dropout, dtype)
    if resolved is None:
        if reinit:
            raise ConfigError("reinit names parameters not to load, but there are no weights to load (weights=None)")
        return model, init_variables(model, key)

    keep_head = num_classes == file_classes and head_hidden == 0 and tuple(head_layers) == DEFAULT_HEAD_LAYERS
    loaded = convert_state_dict(state_dict, backbone, name, with_head=keep_head, source=source)
    if not keep_head:
        head = Head(num_classes, head_hidden, head_dropout, dtype)
        loaded["params"]["head"] = init_variables(head, key, (1, model.head_features))["params"]
    if reinit:
        loaded = _reinitialise(loaded, init_variables(model, jax.random.fold_in(key, 1)), reinit)
    return model, jax.tree_util.tree_map(jnp.asarray, loaded)


def _reinitialise(loaded: dict, fresh: dict, reinit: Sequence[str]) -> dict:
    """`loaded` with the parameters matching `reinit` (and the BatchNorm statistics of those layers) from `fresh`."""
    again = match_patterns(loaded["params"], reinit, "model.reinit")
    params = jax.tree_util.tree_map(lambda new, old, a: new if a else old, fresh["params"], loaded["params"], again)
    reset = {p for p, a in zip(jax.tree_util.tree_leaves(tree_paths(again)), jax.tree_util.tree_leaves(again)) if a}

    def stats(key_path, new, old):
        return new if f"{path_of(key_path[:-1])}/scale" in reset else old

    batch_stats = jax.tree_util.tree_map_with_path(stats, fresh.get("batch_stats", {}), loaded.get("batch_stats", {}))
    return {"params": params, "batch_stats": batch_stats}


def headless(model: Classifier, variables: dict) -> tuple[nn.Module, dict]:
    """The backbone of a classifier and its variables."""
    return model.backbone, {"params": variables["params"]["backbone"],
                            "batch_stats": variables.get("batch_stats", {}).get("backbone", {})}
