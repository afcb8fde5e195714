"""`create_model` and `create_backbone`: a registered variant, optionally with pretrained weights, as
`(module, variables)`; `resolve_weights` turns what a user says ("default", a registered id, a file) into one
`Weights` object, once, which everything after passes along."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.core.errors import ConfigError, MissingFileError
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.models.classifier import DEFAULT_HEAD_LAYERS, Classifier, Head, init_variables
from jaxtl.models.registry import WEIGHTS, PretrainedWeights, build_backbone, get_model_spec, get_weights_entry
from jaxtl.rules import match_patterns, path_of, tree_paths
from jaxtl.weights.convert import checkpoint_classes, convert_state_dict
from jaxtl.core.store import sha256_file
from jaxtl.weights.files import read_state_dict, recorded_sha256, weights_file
from jaxtl.weights.hub import HUB_PREFIX, HubFile
from jaxtl.weights.hub import fetch as fetch_hub

DEFAULT_WEIGHTS = "default"  # the variant's registered default weights


@dataclass(frozen=True)
class Weights:
    """Pretrained weights of `model`, resolved: a registered entry, a local file, or a Hub repository's file (`hub`,
    with `file` its path in the Hub cache)."""

    model: str
    entry: PretrainedWeights | None = None
    file: Path | None = None
    hub: HubFile | None = None

    @property
    def name(self) -> str:
        """The registered id, the `hf-hub:` name, or the file's path."""
        return self.entry.id if self.entry else self.hub.spec if self.hub else str(self.file)

    def path(self) -> Path:
        """The file to read (a registered file is found in its pip package or downloaded once)."""
        return weights_file(self.entry) if self.entry else self.file

    @functools.cached_property
    def identity(self) -> dict:
        """What identifies these weights in cache keys: the registered id and hash, or the file and its sha256."""
        if self.entry:
            return {"id": self.entry.id, "sha256": recorded_sha256(self.entry)}
        if self.hub:
            return {"hub": self.hub.spec, "commit": self.hub.commit, "sha256": self.hub.sha256}
        memo = _memo(self)
        if "sha256" not in memo:
            memo["sha256"] = sha256_file(self.file)
        return {"file": str(self.file), "sha256": memo["sha256"]}

    @property
    def preprocessing(self) -> Preprocessing:
        """What the weights were trained with (a Hub repository: its timm config's; a file: the variant's
        default)."""
        if self.entry:
            return self.entry.preprocessing
        if self.hub:  # what its config.json names, the variant's defaults for the rest (as timm)
            return dataclasses.replace(default_preprocessing(self.model), **dict(self.hub.preprocessing))
        return default_preprocessing(self.model)

    def state_dict(self) -> dict:
        return read_state_dict(self.path())

    @functools.cached_property
    def num_classes(self) -> int:
        """Classes of the file's pretrained classifier; 0 for a headless file."""
        if self.entry:
            return self.entry.num_classes
        memo = _memo(self)
        if "classes" not in memo:  # inside a run the file's arrays wait in the memo for their conversion
            memo["state_dict"] = self.state_dict()
            memo["classes"] = checkpoint_classes(memo["state_dict"], self.model, str(self.file))
        return memo["classes"]


def resolve_weights(model_name: str, weights: str | Path | Weights | None) -> Weights | None:
    """`Weights` for "default", a registered id, `hf-hub:<owner>/<repo>` or a local file; None (random init) for
    None."""
    if weights is None or isinstance(weights, Weights):
        if weights is not None and weights.model != model_name:
            raise ConfigError(f"weights '{weights.name}' were resolved for model '{weights.model}', not "
                              f"'{model_name}'")
        return weights
    weights = str(weights)
    if weights == DEFAULT_WEIGHTS:
        default = get_model_spec(model_name).default_weights
        if default is None:
            raise ConfigError(f"model '{model_name}' has no registered pretrained weights; pass a weights file path")
        weights = default
    if weights.startswith(HUB_PREFIX):
        hub = _HUBS.get(weights) if _HUBS is not None else None
        if hub is None or _stamp(hub.path) != _HUBS.get((weights, "stamp")):
            hub = fetch_hub(weights)  # the revision resolved and the file hashed: once a run
            if _HUBS is not None:
                _HUBS.update({weights: hub, (weights, "stamp"): _stamp(hub.path)})
        return Weights(model_name, file=hub.path, hub=hub)
    if weights in WEIGHTS:
        entry = get_weights_entry(weights)
        if entry.model != model_name:
            raise ConfigError(f"weights '{entry.id}' are for model '{entry.model}', not '{model_name}'")
        return Weights(model_name, entry=entry)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingFileError(
            f"weights '{weights}' is neither a registered weights id for {model_name} nor an existing file; "
            f"use 'default', a file path, {HUB_PREFIX}<owner>/<repo>, or one of the ids in "
            "jaxtl.models.registry.WEIGHTS"
        )
    return Weights(model_name, file=path)


def default_preprocessing(model_name: str) -> Preprocessing:
    """A variant's preprocessing: its default weights', else its own, else ImageNet's at its input size."""
    spec = get_model_spec(model_name)
    if spec.default_weights:
        return get_weights_entry(spec.default_weights).preprocessing
    return spec.preprocessing or Preprocessing(input_size=spec.input_size)


def get_preprocessing(model_name: str, weights: str | Path | Weights | None = DEFAULT_WEIGHTS) -> Preprocessing:
    """The evaluation preprocessing of the weights; for random init, the variant's default."""
    resolved = resolve_weights(model_name, weights)
    return resolved.preprocessing if resolved else default_preprocessing(model_name)


def create_backbone(name: str, weights: str | Path | Weights | None = None, *, rng: int | jax.Array = 0,
                    dtype: Any = jnp.float32, **kwargs) -> tuple[nn.Module, dict]:
    """A backbone alone (named features, no head) and its variables; `weights` as for `create_model`."""
    backbone = build_backbone(name, dtype=dtype, **kwargs)
    resolved = resolve_weights(name, weights)
    if resolved is None:
        key = jax.random.key(rng) if isinstance(rng, int) else rng
        return backbone, init_variables(backbone, key)
    converted = _loaded(name, resolved, backbone, kwargs)[1]
    return backbone, jax.tree_util.tree_map(jnp.array, {c: v["backbone"] for c, v in converted.items()})


def create_model(
    name: str,
    weights: str | Path | Weights | None = None,
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
        default weights, a local `.pth`/`.safetensors`/`.npz` path, or `Weights` already resolved.
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
    file_classes, loaded = _loaded(name, resolved, backbone, backbone_kwargs) if resolved is not None else (1000, None)
    num_classes = file_classes if num_classes is None else num_classes
    if num_classes < 1:
        raise ConfigError(f"{resolved.name if resolved else name} has no classifier: give num_classes, or use "
                          "create_backbone")
    model = Classifier(backbone, num_classes, tuple(head_layers), head_hidden, head_dropout, dtype)
    if resolved is None:
        if reinit:
            raise ConfigError("reinit names parameters not to load, but there are no weights to load (weights=None)")
        return model, init_variables(model, key)

    keep_head = num_classes == file_classes and head_hidden == 0 and tuple(head_layers) == DEFAULT_HEAD_LAYERS
    if not keep_head:
        head = Head(num_classes, head_hidden, head_dropout, dtype)
        loaded["params"]["head"] = init_variables(head, key, (1, model.head_features))["params"]
    if reinit:
        loaded = _reinitialise(loaded, init_variables(model, jax.random.fold_in(key, 1)), reinit)
    return model, jax.tree_util.tree_map(jnp.array, loaded)  # copies: the memo's arrays stay as converted


# Inside `weights_read_once`, what the weights file gave (NumPy arrays): `auto` creates the same pretrained model
# for measuring, timing a step, each trial and the final run, and each of those read and converted the file again.
_MEMO: dict | None = None
_HUBS: dict | None = None  # inside `weights_read_once`: each `hf-hub:` name resolved (its file hashed) once


@contextlib.contextmanager
def weights_read_once() -> Iterator[None]:
    """Within the block (a run), a weights file is read, hashed and converted once: later `create_model` and
    `create_backbone` calls for the same file (path, size, modification time), variant and build arguments take
    the arrays converted the first time, and a Hub name is resolved to its commit and file once. One file's at
    most; forgotten when the outermost block ends."""
    global _MEMO, _HUBS
    outer = _MEMO, _HUBS
    _MEMO, _HUBS = ({}, {}) if outer[0] is None else outer
    try:
        yield
    finally:
        _MEMO, _HUBS = outer


def _stamp(path: Path) -> tuple:
    """What changes when a file is written again: its inode, size and times."""
    stat = Path(path).stat()
    return str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _memo(resolved: Weights) -> dict:
    """The memo for `resolved`'s file, emptied when another file is asked for (an empty one outside a block)."""
    if _MEMO is None:
        return {}
    stamp = (resolved.name, *_stamp(resolved.path()))
    if _MEMO.get("stamp") != stamp:
        _MEMO.clear()
        _MEMO["stamp"] = stamp
    return _MEMO


def _loaded(name: str, resolved: Weights, backbone: nn.Module, backbone_kwargs: dict) -> tuple[int, dict]:
    """`(classes of the file's classifier, its variables converted for backbone)`: with the file's head when it has
    one. Inside `weights_read_once`, remembered for the next call with the same file, variant and build arguments:
    a structure of its own each call (callers add to it), the arrays shared and read-only (callers copy them onto
    devices)."""
    memo = _memo(resolved)
    key = ("loaded", name, repr(sorted((k, v) for k, v in backbone_kwargs.items() if k != "dtype")))
    if key not in memo:
        state_dict = memo.pop("state_dict", None) or resolved.state_dict()
        classes = checkpoint_classes(state_dict, name, resolved.name)
        converted = convert_state_dict(state_dict, backbone, name, with_head=classes > 0, source=str(resolved.path()))
        for leaf in jax.tree_util.tree_leaves(converted):
            if isinstance(leaf, np.ndarray):
                leaf.setflags(write=False)
        memo[key], memo["classes"] = (classes, converted), classes
    classes, converted = memo[key]
    return classes, jax.tree_util.tree_map(lambda leaf: leaf, converted)


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
