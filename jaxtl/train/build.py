"""What a run config says about the model: the backbone, the head, the weights, the dtype, the preprocessing,
and the rules of each phase, checked against the model's parameter paths before any work."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtl.create import create_model, get_preprocessing, resolve_weights
from jaxtl.data.preprocess import Preprocessing
from jaxtl.models.classifier import Classifier, check_features
from jaxtl.models.registry import build_backbone, get_model_spec
from jaxtl.rules import match_patterns, match_rules
from jaxtl.transfer.strategies import Phase, make_phases


def backbone_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`model.kwargs` as plain build arguments (lists as the tuples a module attribute needs)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config.model.kwargs).items()}


def compute_dtype(config: ml_collections.ConfigDict):
    return jnp.bfloat16 if config.train.bf16 else jnp.float32


def weights(config: ml_collections.ConfigDict):
    """The weights the run loads: none for `scratch`."""
    return None if config.transfer.strategy == "scratch" else config.model.weights


def preprocessing(config: ml_collections.ConfigDict) -> Preprocessing:
    prep = get_preprocessing(config.model.name, config.model.weights)
    return prep.with_input_size(config.data.input_size) if config.data.input_size else prep


def head_dropout(config: ml_collections.ConfigDict) -> float:
    dropout = config.head.dropout
    return get_model_spec(config.model.name).head_dropout if dropout is None else float(dropout)


def create(config: ml_collections.ConfigDict, num_classes: int) -> tuple[Classifier, dict]:
    """The `Classifier` of the run and its initial variables (pretrained backbone, new head)."""
    return create_model(config.model.name, weights(config), num_classes, rng=config.seed, dtype=compute_dtype(config),
                        head_layers=tuple(config.head.layers), head_hidden=config.head.hidden,
                        head_dropout=head_dropout(config), reinit=tuple(config.model.reinit) if weights(config) else (),
                        **backbone_kwargs(config))


def classifier(config: ml_collections.ConfigDict, num_classes: int) -> Classifier:
    """The `Classifier` module alone (to restore a checkpoint into)."""
    backbone = build_backbone(config.model.name, dtype=compute_dtype(config), **backbone_kwargs(config))
    return Classifier(backbone, num_classes, tuple(config.head.layers), config.head.hidden, head_dropout(config),
                      compute_dtype(config))


def phases(config: ml_collections.ConfigDict, groups) -> list[Phase]:
    t = config.transfer
    return make_phases(t.strategy, config.train.epochs, groups, num_stages=t.num_stages, lr_ratio=t.lr_ratio,
                       phase_epochs=tuple(t.phase_epochs), rules=tuple(t.rules))


def check_model_config(config: ml_collections.ConfigDict) -> None:
    """Everything that needs the model, before any work: the model and its build arguments, the weights, the
    head's layers, and every rule list (`transfer.rules` or the strategy's presets, `optimizer.decay_rules`,
    `model.reinit`) against the parameter paths. Builds no variables: the paths come from `jax.eval_shape`."""
    model = classifier(config, num_classes=2)
    check_features(model.backbone, config.head.layers, "head.layers")
    if weights(config) is not None:
        resolve_weights(config.model.name, weights(config))
    size = preprocessing(config).input_size  # at the run's own size: a ViT needs multiples of its patch size
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
    if config.transfer.strategy != "auto":
        for i, phase in enumerate(phases(config, model.backbone.groups)):
            match_rules(params, phase.rules, "transfer.rules" if config.transfer.strategy == "custom" else
                        f"transfer.strategy={config.transfer.strategy} (phase {i})")
    match_rules(params, config.optimizer.decay_rules, "optimizer.decay_rules")
    if config.model.reinit and weights(config) is not None:
        match_patterns(params, config.model.reinit, "model.reinit")


def multipliers(params: Any, phase: Phase, key: str) -> Any:
    """The LR multiplier of every parameter in `phase` (a float tree like `params`)."""
    return jax.tree_util.tree_map(float, match_rules(params, phase.rules, key))


def decay_mask(params: Any, config: ml_collections.ConfigDict) -> Any:
    return jax.tree_util.tree_map(bool, match_rules(params, config.optimizer.decay_rules, "optimizer.decay_rules"))


def parameter_count(tree: Any, mask: Any = None) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    keep = jax.tree_util.tree_leaves(mask) if mask is not None else [True] * len(leaves)
    return int(sum(np.prod(np.shape(x)) for x, k in zip(leaves, keep) if k))
