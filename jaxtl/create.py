"""`create_model`: a registered variant, optionally with pretrained weights and a new head, as (module, variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.data.preprocess import Preprocessing
from jaxtl.models.common import DEFAULT_HEAD_LAYERS, Classifier, init_variables
from jaxtl.models.registry import get_model_spec
from jaxtl.weights.convert import convert_state_dict
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
            raise ValueError(f"model '{model_name}' has no registered pretrained weights; pass a weights file path")
        weights = default
    if is_weights_id(weights):
        entry = get_weights_entry(weights)
        if entry.model != model_name:
            raise ValueError(f"weights '{entry.id}' are for model '{entry.model}', not '{model_name}'")
        return entry
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(
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


def create_model(
    name: str,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    *,
    rng: int | jax.Array = 0,
    dtype: Any = jnp.float32,
    **model_kwargs,
) -> tuple[nn.Module, dict]:
    """Builds a registered variant and its variables.

    Args:
      name: a registered variant (`jaxtl.models.registry.MODELS`), e.g. "resnet50", "efficientnet_lite0".
      weights: None for random init, a registered id (e.g. "resnet50.tv2_in1k"), "default" for the variant's
        default weights, or a local `.pth`/`.safetensors` path.
      num_classes: head width. With pretrained weights and a value other than the checkpoint's, the head is
        replaced by a freshly initialised one and the backbone weights are kept; 0 removes the head.
      rng: seed or key for random initialisation (of the whole model, or of the new head).
      dtype: computation dtype (parameters stay float32).
      model_kwargs: passed to the module (e.g. `dropout_rate`, `drop_path_rate`, `head_layers=("stage3", "stage4")`
        for a head on several layers' pooled features, `head_hidden=512` for an MLP head).

    Returns:
      `(model, variables)`; `model.apply(variables, images)` gives logits for NHWC images preprocessed as
      `get_preprocessing(name, weights)` says.
    """
    spec = get_model_spec(name)
    resolved = resolve_weights(name, weights)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    if resolved is None:
        model = spec.build(num_classes=1000 if num_classes is None else num_classes, dtype=dtype, **model_kwargs)
        return model, init_variables(model, key)

    path = weights_file(resolved) if isinstance(resolved, PretrainedWeights) else resolved
    state_dict = read_state_dict(path)
    checkpoint_classes = _checkpoint_classes(resolved, state_dict)
    num_classes = checkpoint_classes if num_classes is None else num_classes
    model = spec.build(num_classes=num_classes, dtype=dtype, **model_kwargs)
    keep_head = num_classes == checkpoint_classes and model.head_hidden == 0 and (
        tuple(model.head_layers) == DEFAULT_HEAD_LAYERS)
    source_model = model if keep_head else spec.build(num_classes=checkpoint_classes, dtype=dtype, **(
        model_kwargs | {"head_layers": DEFAULT_HEAD_LAYERS, "head_hidden": 0}))
    converted = convert_state_dict(
        state_dict, source_model, name, skip_groups=() if keep_head else ("head",), source=str(path)
    )
    if num_classes and not keep_head:
        head = Classifier(num_classes=num_classes, hidden=model.head_hidden, dtype=dtype)
        converted["params"]["head"] = init_variables(head, key, (1, model.num_features))["params"]
    return model, jax.tree_util.tree_map(jnp.asarray, converted)


def _checkpoint_classes(resolved, state_dict: dict) -> int:
    if isinstance(resolved, PretrainedWeights):
        return resolved.num_classes
    for key in ("fc.bias", "_fc.bias", "classifier.bias"):
        if key in state_dict:
            return int(np.shape(state_dict[key])[0])
    return 0  # a headless backbone file


def headless(model: nn.Module, variables: dict) -> tuple[nn.Module, dict]:
    """The backbone of a classifier: the same module with `num_classes=0` and the head's build arguments at their
    defaults, and its variables without the head."""
    backbone = model.clone(num_classes=0, head_layers=DEFAULT_HEAD_LAYERS, head_hidden=0)
    params = {group: p for group, p in variables["params"].items() if group != "head"}
    return backbone, {"params": params, "batch_stats": variables.get("batch_stats", {})}
