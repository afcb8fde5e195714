"""What a run config says about the model: build arguments, compute dtype, preprocessing."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from jaxtl.create import get_preprocessing
from jaxtl.data.preprocess import Preprocessing
from jaxtl.models.common import FEATURE_LAYERS


def head_layers(names) -> tuple[str, ...]:
    """`head.layers` as model layers: `pre_logits` is the pooled last stage."""
    names = (names,) if isinstance(names, str) else tuple(names)
    layers = tuple(dict.fromkeys("stage4" if name == "pre_logits" else name for name in names))
    unknown = [name for name in layers if name not in FEATURE_LAYERS]
    if not layers or unknown:
        raise ValueError(f"head.layers {list(names)}: choose one or more of pre_logits, {', '.join(FEATURE_LAYERS)}")
    return layers


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`model.kwargs` plus the head's layers and hidden width."""
    kwargs = dict(config.model.kwargs)
    return kwargs | {"head_layers": head_layers(config.head.layers), "head_hidden": int(config.head.hidden)}


def plain_kwargs(kwargs: dict) -> dict:
    """Build arguments read back from JSON: lists become the tuples a module attribute needs."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def compute_dtype(config: ml_collections.ConfigDict):
    return jnp.bfloat16 if config.train.bf16 else jnp.float32


def preprocessing(config: ml_collections.ConfigDict) -> Preprocessing:
    prep = get_preprocessing(config.model.name, config.model.weights)
    return prep.with_input_size(config.data.input_size) if config.data.input_size else prep
