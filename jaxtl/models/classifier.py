"""A classifier is a backbone and a head, composed (timm's `forward_features` / `forward_head`, big_vision's
`(logits, out)`). Every backbone follows the contract of `jaxtl.models.backbone` and knows nothing of heads.
`Classifier` pools the features its head reads (`head_layers`; maps are global-average pooled, `pre_logits` is
used as it is), concatenates them and applies `Head`. Its parameters are
`{"backbone": ..., "head": ...}`, so parameter rules and checkpoints address both by path.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.core.errors import ConfigError
from jaxtl.models.backbone import PRE_LOGITS
from jaxtl.models.layers import global_pool
from jaxtl.models.lora import lora_branch

DEFAULT_HEAD_LAYERS = (PRE_LOGITS,)


class Head(nn.Module):
    """Dropout and a linear layer, with `hidden > 0` a small MLP (Dense, ReLU, dropout, Dense), or with `knn > 0`
    a cosine k-nearest-neighbour vote (`knn_vote`) over a bank of training features held as parameters.

    Takes pooled features `(B, D)`, so the same parameters classify images (inside `Classifier`) and cached
    features; logits are at least float32 whatever the compute dtype.
    """

    num_classes: int
    hidden: int = 0
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    knn: int = 0

    @nn.compact
    def __call__(self, features: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        out_dtype = jnp.promote_types(features.dtype, jnp.float32)
        if self.knn:
            # The bank's size is the training split's, known only once it is filled (`self.variable` takes the
            # stored shape where `self.param` would insist on the initial one).
            bank = self.variable("params", "bank", jnp.zeros, (0, features.shape[-1]), jnp.float32).value
            labels = self.variable("params", "labels", jnp.zeros, (0, self.num_classes), jnp.float32).value
            return knn_vote(features, bank, labels, self.knn).astype(out_dtype)
        y = features
        if self.hidden:
            y = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(y))
        if self.dropout_rate:
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(y).astype(out_dtype)


def knn_vote(features: jnp.ndarray, bank: jnp.ndarray, labels: jnp.ndarray, k: int) -> jnp.ndarray:
    """Log-probabilities of a cosine kNN vote: each row of `features` `(B, D)` finds its `k` most similar rows of
    `bank` `(N, D)` (unit rows), each voting for its one-hot `labels` row `(N, C)` with its similarity (clipped at
    0), as `jaxtl.features.fewshot.knn_predict` does; the votes normalised to probabilities (uniform when nothing
    votes). An empty bank (a head not filled yet) gives uniform log-probabilities."""
    num_classes = labels.shape[-1]
    # jnp: the variables may hold NumPy arrays (`knn_bank`, a restored checkpoint), which a traced index cannot take
    bank, labels = jnp.asarray(bank), jnp.asarray(labels)
    if bank.shape[0] == 0:
        return jnp.full((features.shape[0], num_classes), -jnp.log(num_classes), jnp.float32)
    x = features.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    similarity, nearest = jax.lax.top_k(x @ bank.T, min(k, bank.shape[0]))
    votes = jnp.einsum("bk,bkc->bc", jnp.maximum(similarity, 0.0), labels[nearest])
    total = votes.sum(-1, keepdims=True)
    probabilities = jnp.where(total > 0, votes / jnp.where(total > 0, total, 1.0), 1.0 / num_classes)
    return jnp.log(jnp.maximum(probabilities, 1e-12))


def knn_bank(features, labels, num_classes: int) -> dict:
    """The parameters of a kNN head (`Head.knn`) voting with `features` `(N, D)` of classes `labels` `(N,)`: the
    features as unit rows, the labels one-hot, both float32."""
    features = np.asarray(features, np.float32)
    bank = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return {"bank": bank, "labels": np.eye(num_classes, dtype=np.float32)[np.asarray(labels, np.int64)]}


def check_features(backbone: nn.Module, names: Sequence[str], key: str) -> tuple[str, ...]:
    """`names` as a tuple of distinct feature names of the backbone; anything else is an error naming `key`."""
    layers = (names,) if isinstance(names, str) else tuple(names)
    unknown = [name for name in layers if name not in backbone.features]
    if not layers or unknown or len(set(layers)) != len(layers):
        raise ConfigError(f"{key}={list(layers)}: choose one or more distinct features of "
                          f"{type(backbone).__name__}: {', '.join(backbone.features)}")
    return layers


def head_input(features: dict[str, jnp.ndarray], head_layers: Sequence[str]) -> jnp.ndarray:
    """The pooled `head_layers`, concatenated in order: `(B, sum of channels)`, at least float32."""
    pooled = [global_pool(features[name]) for name in head_layers]
    return pooled[0] if len(pooled) == 1 else jnp.concatenate(pooled, axis=-1)


def is_backbone_feature(context, name: str) -> bool:
    """Whether a Flax method interceptor's `context` is the call of the backbone's submodule `name` (a stage, or
    the stem), whose output is that backbone feature (a ViT's: its tokens)."""
    module = context.module
    return (context.method_name == "__call__" and module.name == name
            and getattr(module.parent, "name", None) == "backbone")


class Classifier(nn.Module):
    """`backbone` + `Head` over the pooled `head_layers`.

    `apply(variables, images)` returns `(logits, features)`: the logits and every named feature of the backbone
    (under `jit`, the unused ones cost nothing). `apply(..., method="classify_features")` runs the head alone on
    precomputed `head_input` features (the feature cache), with the same parameters; `method="classify_maps"`
    runs the backbone from the feature `maps_from` on, over its precomputed maps (the map cache).
    """

    backbone: nn.Module
    num_classes: int
    head_layers: Sequence[str] = DEFAULT_HEAD_LAYERS
    head_hidden: int = 0
    head_dropout: float = 0.0
    dtype: Any = jnp.float32
    lora_scale: float = 0.0  # > 0: layers holding LoRA factors add their low-rank branch (`jaxtl.models.lora`)
    maps_from: str = ""  # classify_maps: the backbone feature whose maps it takes ...
    maps_input_size: int = 0  # ... computed from images of this side
    head_knn: int = 0  # > 0: the head is a k-nearest-neighbour vote over a bank of features (`Head.knn`)

    def setup(self):
        check_features(self.backbone, self.head_layers, "head_layers")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}; for features alone use the "
                              "backbone (jaxtl.create_backbone)")
        self.head = Head(self.num_classes, self.head_hidden, self.head_dropout, self.dtype, self.head_knn)

    def __call__(self, images: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, dict]:
        with self._lora():
            features = self.backbone(images, train=train)
            return self.head(head_input(features, self.head_layers), train), features

    def classify_features(self, pooled: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, dict]:
        with self._lora():
            return self.head(pooled, train), {}

    def classify_maps(self, maps: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, dict]:
        """The classifier from the backbone feature `maps_from` on: `maps` (what a frozen lower part computed once,
        `(B, H, W, C)`) take the place of that stage's output. The stages below are traced over a blank image of
        side `maps_input_size`; nothing uses their outputs, so XLA drops them and a step costs the stages above
        and the head (`tests/test_trials.py` checks the loss and gradients against the whole network's)."""
        if not self.maps_from or not self.maps_input_size:
            raise ConfigError("classify_maps needs maps_from (a backbone feature) and maps_input_size")

        def enter(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if not is_backbone_feature(context, self.maps_from):
                return out
            if out.shape[1:] != maps.shape[1:]:
                raise ConfigError(f"cached maps of {self.maps_from} are {maps.shape[1:]}, the model's are "
                                  f"{out.shape[1:]} at input size {self.maps_input_size} (a CNN's stage maps only)")
            return maps.astype(out.dtype)

        size = self.maps_input_size
        with nn.intercept_methods(enter):
            return self(jnp.zeros((maps.shape[0], size, size, 3), self.dtype), train)

    def _lora(self):
        return nn.intercept_methods(lora_branch(self.lora_scale)) if self.lora_scale else contextlib.nullcontext()

    @property
    def head_features(self) -> int:
        """Width of the head's input."""
        channels = self.backbone.feature_channels
        return sum(channels[name] for name in self.head_layers)


def init_variables(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...] = (1, 32, 32, 3)) -> dict:
    """`model.init` under jit on a small input (parameter shapes do not depend on the input size).

    XLA:CPU compiles the partitionable threefry generator about 4x slower (11 s against 3 s for a tiny ResNet's
    init); variables are replicated, so partitioning their random bits gains nothing and the plain generator is
    used.
    """
    with jax.threefry_partitionable(False):
        return dict(jax.jit(model.init)(key, jnp.zeros(input_shape, jnp.float32)))
