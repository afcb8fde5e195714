"""Run configs: `ml_collections.ConfigDict`s from `configs/*.py` files, overridden by `KEY=VALUE` flags.

Every config starts from `base_config()`, which holds every key a run reads, so a misspelled key in a
file or on the command line is an error naming it, and a value of the wrong type is an error too.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path
from typing import Sequence

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every key a training run reads."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress = True  # progress bars
    c.model = dict(name="efficientnet_lite0", weights="default", kwargs=ml_collections.ConfigDict())
    c.data = dict(
        source="folder",  # folder | tfds
        path="", download_url="",  # folder: where it is; a zip archive to fetch if it is missing
        name="", tfds_data_dir="", tfds_download=True,  # tfds: dataset name, data_dir (default $JAXTL_DATA_DIR/tfds)
        val_fraction=0.2, test_fraction=0.0, skip_bad_images=False,
        input_size=0,  # 0: the weights' own input size
        augment=dict(enabled=True, crop_scale=(0.08, 1.0), flip=True),
    )
    c.head = dict(
        layers=("pre_logits",),  # pooled outputs concatenated as the classifier's input: pre_logits, stage1..4, stem
        hidden=0,  # 0: linear head; >0: an MLP head with this many hidden units
    )
    c.features = dict(
        cache=True,  # linear_probe: train the head on cached backbone features (no augmentation)
        cache_dir="",  # default $JAXTL_CACHE_DIR/features
        l2_grid=(),  # linear head on the cache: L2 strengths tried, best val accuracy kept; () = 1e-6..1e3
        max_iter=1000,  # L-BFGS iterations per L2 strength
    )
    c.transfer = dict(
        # auto | linear_probe | finetune_top | finetune_all | discriminative | gradual | scratch
        strategy="finetune_all",
        num_stages=1,  # finetune_top: how many of the last stages train
        lr_ratio=0.01,  # discriminative: stem LR / head LR
        phase_epochs=(),  # gradual: epochs of each phase (head, +stage4, +stage3, ...)
        train_frozen_bn=False,  # False (Keras rule): frozen groups' BatchNorm keeps its ImageNet statistics
    )
    c.optimizer = dict(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, warmup_epochs=1.0, label_smoothing=0.1)
    c.train = dict(epochs=10, batch_size=32, bf16=False)
    return c


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    """Runs `get_config()` of a config file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file '{path}' does not exist")
    spec = importlib.util.spec_from_file_location(f"jaxtl_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file '{path}' has no get_config() function")
    config = module.get_config()
    check_keys(config, base_config(), str(path))
    return config


def check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, source: str, prefix="") -> None:
    """Every key of `config` must exist in `reference` (except under free-form `model.kwargs`)."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in reference:
            raise KeyError(_unknown_key_message(name, reference, prefix, source))
        if isinstance(value, ml_collections.ConfigDict) and name != "model.kwargs":
            check_keys(value, reference[key], source, f"{name}.")


def _unknown_key_message(name: str, reference, prefix: str, source: str) -> str:
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(reference.keys()), n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys here: {', '.join(reference.keys())}"
    return f"{source}: unknown config key '{name}'{hint}"


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `KEY=VALUE` strings (VALUE parsed as a Python literal, else taken as a string)."""
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"config override '{override}' must be KEY=VALUE, e.g. train.epochs=3")
        key, text = override.split("=", 1)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        node, prefix = config, ""
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise KeyError(_unknown_key_message(prefix + part, node, prefix, "--config"))
            node, prefix = node[part], f"{prefix}{part}."
        if leaf not in node and key.rsplit(".", 1)[0] != "model.kwargs":
            raise KeyError(_unknown_key_message(key, node, prefix, "--config"))
        try:
            node[leaf] = tuple(value) if isinstance(node.get(leaf), tuple) and isinstance(value, list) else value
        except TypeError as e:
            raise ValueError(f"--config.{key}: {e}") from e
    return config
