"""Run configs: `ml_collections.ConfigDict`s from `configs/*.py` files, overridden by `KEY=VALUE` flags.

Every key is declared once, in `KEYS` (its default, meaning, the values it takes and the strategies that read
it); every config starts from `base_config()`, made from those declarations, so a misspelled key in a file or on
the command line is an error naming it, and a value of the wrong type is an error too. `docs/config.md`, the
configuration reference, is generated from them (`jaxtl.commands.config_reference`). A config file's
`get_config(arg)` takes big_vision's variant argument: `--config configs/ants_bees.py:finetune_top`.

Before any work, `check_values` checks every value against its declaration and the rules between keys (each
error names the key, the value and what is allowed); which keys a run reads, and so which set keys it would
ignore (an error), is the declarations' to say, narrowed by what the run's readers read
(`jaxtl.train.run.keys_read`). A run writes its resolved config (`save_resolved`) beside its checkpoints; `eval`
and `predict --workdir` read it back (`load_resolved`).

The config is read at the top (the commands, `auto`, the plan of a run); below that only the parts it resolved to
travel (the layers say so, `.importlinter`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections

from jaxtl.core.atomic import damage_reason, read_json, write_json_atomic
from jaxtl.core.errors import ConfigError, MissingFileError, RunFileError
from jaxtl.data.augment import BINS, POLICIES
from jaxtl.data.images import DEFAULT_MAX_PIXELS
from jaxtl.data.pipeline import SAMPLERS
from jaxtl.transfer.recipe import CLASS_WEIGHTS, TTA
from jaxtl.transfer.optimizer import OPTIMIZERS
from jaxtl.models.registry import MODELS, parse_models
from jaxtl.transfer.strategies import AUTO_CANDIDATES, STRATEGIES

DEFAULT_DECAY_RULES = ((".*/kernel", True), (".*", False))  # weight decay on kernels only


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pair(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2


def _side(value: Any) -> bool:
    return _int(value) and (value == 0 or 32 <= value <= 4096)


def _within(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    """A number in the interval from `low` to `high` (either end open)."""
    def check(value: Any) -> bool:
        return _number(value) and (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    return check


def _at_least(low: int) -> Callable[[Any], bool]:
    return lambda value: _int(value) and value >= low


def _sequence(value: Any) -> bool:
    return isinstance(value, (tuple, list))


def _backbone_list(value: Any) -> bool:
    """`transfer.auto_models`: registered names, each with its weights (`NAME=WEIGHTS`) or not, none twice (what
    `parse_models` takes)."""
    if not _sequence(value) or not all(isinstance(s, str) for s in value):
        return False
    try:
        parse_models(value)
    except ConfigError:
        return False
    return True


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda value: value in choices


@dataclass(frozen=True)
class Key:
    """One config key, declared once: its default, what it means (`doc`), and the values it takes (`check` of the
    value alone, `allowed` the error's and the reference's words for them; no check: any value, or checked where
    the model is known, `jaxtl.train.plan.check_model`), and the strategies whose runs read it (`read_by`: every
    strategy when empty; `auto` for what `auto` reads itself). The unread-key check and the reference take the
    strategies from here; within a strategy, settings that make a key matter (an MLP head's width matters only
    with an MLP head) are recorded from the readers (`jaxtl.train.run.keys_read`), which may read no key a
    strategy this does not name: the recording refuses it, and `tests/test_config.py` checks the declaration
    names no strategy that never reads the key."""

    default: Any
    doc: str
    allowed: str = ""
    check: Callable[[Any], bool] | None = None
    read_by: tuple[str, ...] = ()

    def read_by_strategy(self, strategy: str) -> bool:
        """Whether runs of `strategy` (or `auto` itself) read this key."""
        return strategy in self.read_by if self.read_by else strategy != "auto"


def _all_but(*strategies: str) -> tuple[str, ...]:
    return tuple(name for name in STRATEGIES if name not in strategies)


_ANY_SIDE = "0 (the weights' own size) or an image side from 32 to 4096"
KEYS: dict[str, Key] = {
    "seed": Key(0, "Seeds initialisation, data order, augmentation, dropout and the carved splits."),
    "progress": Key(True, "Progress bars."),
    "model.name": Key("efficientnet_lite0", "The backbone variant (`jaxtl.models.registry.MODELS`).",
                      "a registered variant"),
    "model.weights": Key("default", "`default` (the variant's registered weights), a registered id, a "
                         "`.pth`/`.safetensors`/`.npz` path, `hf-hub:<owner>/<repo>`, or None (random init).",
                         "default, a weights id, a file, hf-hub:NAME or None"),
    "model.kwargs": Key(ml_collections.ConfigDict(), "Backbone build arguments (`drop_path_rate`, `remat`, "
                        "`width` ...), one key."),
    "model.reinit": Key((), "Regexes over parameter paths initialised afresh instead of loaded (big_vision's "
                        "`dont_load`).", read_by=_all_but("scratch")),
    "data.source": Key("folder", "Where the images come from: a folder of class folders, a TFDS dataset, a "
                       "manifest (a .csv or .jsonl listing of paths, labels and splits) or a Hugging Face dataset.",
                       "choose 'folder', 'tfds', 'manifest' or 'hf'", _one_of("folder", "tfds", "manifest", "hf")),
    "data.path": Key("", "folder: the folder of class folders (with or without train/val/test folders); manifest: "
                     "the .csv or .jsonl file (`jaxtl.data.listing`)."),
    "data.download_url": Key("", "folder: a zip archive fetched (checked, unpacked) when `data.path` is missing."),
    "data.name": Key("", "tfds: the dataset name, e.g. `tf_flowers`; hf: a Hugging Face dataset name or a folder "
                     "written by `save_to_disk` (`jaxtl.data.hf`)."),
    "data.hf_image_column": Key("image", "hf: the column of images (an `Image` feature, bytes or file paths)."),
    "data.hf_label_column": Key("label", "hf: the column of labels (its `ClassLabel` names are the classes)."),
    "data.multi_label": Key(False, "manifest, hf: each image has any number of the labels (sigmoid outputs, "
                            "binary cross-entropy, mAP; `jaxtl.data.listing`, `jaxtl.data.hf`)."),
    "data.label_delimiter": Key(" ", "manifest, multi_label: what separates a CSV row's labels (a JSON line gives a "
                                "list).", "a non-empty separator, e.g. ' ' or ';'",
                                lambda v: isinstance(v, str) and v != ""),
    "data.tfds_data_dir": Key("", "tfds: its data_dir (default `$JAXTL_DATA_DIR/tfds`)."),
    "data.tfds_download": Key(True, "tfds: build the dataset when it is not there."),
    "data.val_fraction": Key(0.2, "Carved from train (seeded, stratified) when there is no val split.",
                             "must be in [0, 1)", _within(0, 1, high_open=True)),
    "data.test_fraction": Key(0.0, "Carved from train when a folder has no split folders at all.",
                              "must be in [0, 1)", _within(0, 1, high_open=True)),
    "data.skip_bad_images": Key(False, "False: an unreadable image is an error naming it; True: skipped and "
                                "counted."),
    "data.max_image_pixels": Key(DEFAULT_MAX_PIXELS, "Larger images are refused (decompression bombs).",
                                 "must be a positive integer", _at_least(1)),
    "data.exif_orientation": Key(True, "Turn photos upright by their EXIF orientation tag, as photo viewers do."),
    "data.input_size": Key(0, "The image side the model sees.", _ANY_SIDE, _side),
    "data.augment.enabled": Key(True, "Augmentation of the training images (off: the eval transform)."),
    "data.augment.crop_scale": Key((0.08, 1.0), "Random resized crops: the (min, max) area fraction.",
                                   "a (min, max) area fraction with 0 < min <= max <= 1",
                                   lambda v: _pair(v) and _number(v[0]) and _number(v[1]) and 0 < v[0] <= v[1] <= 1),
    "data.augment.flip": Key(True, "Random horizontal flips."),
    "data.augment.mixup": Key(0.0, "Mixup's Beta alpha, on the device (0: off; timm's 0.8).",
                              "0 (off) or a Beta alpha, e.g. 0.8", lambda v: _number(v) and v >= 0),
    "data.augment.cutmix": Key(0.0, "CutMix's Beta alpha (0: off; timm's 1.0).", "0 (off) or a Beta alpha, e.g. 1.0",
                               lambda v: _number(v) and v >= 0),
    "data.augment.mix_switch_prob": Key(0.5, "With both on: the chance a batch is CutMixed rather than Mixup'd.",
                                        "a probability in [0, 1]", _within(0, 1), read_by=_all_but("linear_probe")),
    "data.augment.policy": Key("none", "Per image on the device (`jaxtl.data.augment`).",
                               f"choose from {', '.join(POLICIES)}", _one_of(*POLICIES)),
    "data.augment.magnitude": Key(9, "RandAugment's magnitude bin.", f"a magnitude bin from 0 to {BINS - 1} "
                                  "(torchvision's RandAugment; 9 is its default)",
                                  lambda v: _int(v) and 0 <= v < BINS),
    "data.augment.num_ops": Key(2, "RandAugment's operations per image.",
                                "a number of operations per image (RandAugment's N, 2 by default)", _at_least(0)),
    "data.augment.color_jitter": Key(0.0, "Brightness, contrast and saturation strength (timm's 0.4; 0: off).",
                                     "0 (off) or a strength up to 1, e.g. 0.4", _within(0, 1)),
    "data.augment.random_erasing": Key(0.0, "The chance an image gets a box of noise (timm's reprob 0.25; 0: off).",
                                       "0 (off) or a probability, e.g. 0.25", _within(0, 1)),
    "data.sampler": Key("uniform", "How training draws its examples each epoch: uniform (each once) or balanced "
                        "(each class as often as the others, a rare class's examples repeated; seeded, the same on "
                        "resume); beside train.class_weights.", f"choose from {', '.join(SAMPLERS)}",
                        _one_of(*SAMPLERS)),
    "data.workers": Key(0, "0: decode in threads; N: in N worker processes (many-core hosts; seconds to start).",
                        "0 (threads) or a number of worker processes", _at_least(0)),
    "data.decoded_cache": Key(False, "Decode every image once into a memory-mapped uint8 cache that later epochs "
                              "read."),
    "data.decoded_cache_side": Key(0, "The train split's stored shorter side (0: the resize size).",
                                   "0 (the preprocessing's resize size) or an image side from 32 to 4096", _side),
    "head.layers": Key(("pre_logits",), "Backbone features the classifier reads, pooled and concatenated.",
                       "names of the backbone's features"),
    "head.hidden": Key(0, "0: a linear head; > 0: an MLP head with this many hidden units.",
                       "0 (linear head) or a hidden width", _at_least(0)),
    "head.dropout": Key(None, "Before the classifier; None: the backbone's own (0.2 for EfficientNet-Lite0).",
                        "None (the backbone's own) or a rate in [0, 1)",
                        lambda v: v is None or _within(0, 1, high_open=True)(v)),
    "head.knn": Key(0, "linear_probe: > 0: no fit, a cosine vote of the k most similar cached train features."),
    "transfer.strategy": Key("linear_probe", "How much trains (README, strategies).",
                             f"choose from {', '.join(STRATEGIES)} or auto", _one_of(*STRATEGIES, "auto")),
    "transfer.num_stages": Key(1, "finetune_top: how many of the last groups train.", "a positive number of groups",
                               _at_least(1), read_by=("finetune_top",)),
    "transfer.lr_ratio": Key(0.01, "discriminative: the first group's LR / the head's.",
                             "must be in (0, 1] (first group's LR / head's LR)", _within(0, 1, low_open=True),
                             read_by=("discriminative",)),
    "transfer.lora_rank": Key(8, "lora: the factors' rank.", "a positive rank, e.g. 8", _at_least(1),
                              read_by=("lora",)),
    "transfer.lora_alpha": Key(16.0, "lora: the branch is alpha / rank * x A B.",
                               "a positive scale numerator, e.g. 16", lambda v: _number(v) and v > 0,
                               read_by=("lora",)),
    "transfer.lora_targets": Key((), "lora: regexes over kernel paths; (): the family's (ViT attention + MLP, CNN "
                                 "1x1 convolutions).",
                                 "regexes over kernel paths, e.g. ('backbone/stage4/.*/kernel',), or () for the "
                                 "family's default", lambda v: all(isinstance(p, str) for p in v), read_by=("lora",)),
    "transfer.vpt_prompts": Key(10, "vpt (ViTs): prompt tokens.",
                                "a number of prompt tokens, e.g. 10 (0: the pretrained ViT unchanged)", _at_least(0),
                                read_by=("vpt",)),
    "transfer.vpt_deep": Key(False, "vpt: False: prompts before the first block; True: at every block.",
                             "True (prompts at every block) or False (the first)", lambda v: isinstance(v, bool),
                             read_by=("vpt",)),
    "transfer.phase_epochs": Key((), "gradual: epochs of each phase (head, + last group, ...); the run's epochs are "
                                 "their sum.", "positive epoch counts, one per phase, e.g. (2, 2, 3)",
                                 lambda v: all(_int(n) and n >= 1 for n in v), read_by=("gradual",)),
    "transfer.rules": Key((), "custom: ((regex, LR multiplier), ...) over parameter paths, first match wins, 0 "
                          "freezes.", "(regex, multiplier) pairs", read_by=("custom",)),
    "transfer.train_frozen_bn": Key(False, "False (Keras' rule): frozen BatchNorm layers keep their ImageNet "
                                    "statistics."),
    "transfer.cached_maps": Key(False, "finetune_top, gradual (CNNs): the frozen groups run once per image, the top "
                                "trains on their cached maps; flip of the maps is the only augmentation kept.",
                                "True (train the top on cached maps of the frozen part) or False (on images)",
                                lambda v: isinstance(v, bool), read_by=("finetune_top", "gradual")),
    "transfer.cached_maps_gb": Key(8.0, "cached_maps: past this size, a seeded stratified subset of the train "
                                   "split's maps.", "a positive size in GB", lambda v: _number(v) and v > 0,
                                   read_by=("finetune_top", "gradual")),
    "transfer.auto_budget_minutes": Key(10.0, "auto: the whole run's time: measuring, the trials and the final "
                                        "run's training, which continues the winning trial (probes take seconds); "
                                        "0: no trials.", "0 (no trials) or a number of minutes",
                                        lambda v: _number(v) and v >= 0, read_by=("auto",)),
    "transfer.auto_candidates": Key((), "auto: try these (probe_pre_logits, ..., finetune_all); (): the matrix "
                                    "cell's.", f"a list of candidate names: {', '.join(AUTO_CANDIDATES)}",
                                    lambda v: _sequence(v) and all(c in AUTO_CANDIDATES for c in v), read_by=("auto",)),
    "transfer.auto_models": Key((), "auto: backbones to choose from, `NAME` (its registered weights) or "
                                "`NAME=WEIGHTS` (an id, a file, hf-hub:REPO, or none), ranked by the kNN accuracy on val "
                                "of their features; the trials run on the best (`jaxtl.advice.models`). (): model.name.",
                                f"a list of registered model names ({', '.join(sorted(MODELS))}), each NAME or "
                                "NAME=WEIGHTS, each backbone once",
                                _backbone_list, read_by=("auto",)),
    "transfer.auto_trial_epochs": Key(1, "auto: the first rung: every fine-tuning candidate trains its run (the "
                                      "run's schedule, every training image) this many epochs; the better half go "
                                      "on to twice that, and so on, the last to train.epochs.",
                                      "a positive number of epochs", _at_least(1), read_by=("auto",)),
    "features.cache": Key(True, "linear_probe: train the head on cached backbone features (no augmentation).",
                          read_by=("linear_probe", "auto")),
    "features.cache_dir": Key("", "Default `$JAXTL_CACHE_DIR/features`; a URL (`gs://...`) shares the cache through a "
                              "bucket, mirrored locally (`jaxtl.core.store`).",
                              read_by=("linear_probe", "finetune_top", "gradual", "auto")),
    "probe.l2_grid": Key((), "L2 strengths tried, the best val accuracy kept; (): 19 values 1e-6..1e3.",
                         "positive L2 strengths, e.g. (1e-3, 1e-2, 1e-1), or () for the default grid",
                         lambda v: all(_number(x) and x > 0 for x in v), read_by=("linear_probe", "auto")),
    "probe.max_iter": Key(1000, "L-BFGS iterations per L2 strength.", "a positive iteration count", _at_least(1),
                          read_by=("linear_probe",)),
    "optimizer.name": Key("sgd", "The optimizer.", f"choose from {', '.join(OPTIMIZERS)}", _one_of(*OPTIMIZERS)),
    "optimizer.lr": Key(0.01, "The peak learning rate (the head's; multipliers scale it per parameter).",
                        "must be positive", lambda v: _number(v) and v > 0),
    "optimizer.momentum": Key(0.9, "SGD's momentum.", "must be in [0, 1)", _within(0, 1, high_open=True)),
    "optimizer.weight_decay": Key(1e-4, "Decoupled weight decay, on the parameters `decay_rules` names.",
                                  "must be >= 0", lambda v: _number(v) and v >= 0),
    "optimizer.decay_rules": Key(DEFAULT_DECAY_RULES, "((regex, decay?), ...) over parameter paths: kernels only by "
                                 "default.", "(regex, bool) pairs"),
    "optimizer.warmup_epochs": Key(1.0, "Linear warm-up before the cosine decay.", "must be >= 0",
                                   lambda v: _number(v) and v >= 0),
    "optimizer.label_smoothing": Key(0.1, "Label smoothing of the cross-entropy.", "must be in [0, 1)",
                                     _within(0, 1, high_open=True)),
    "optimizer.layer_decay": Key(1.0, "< 1: each block below the head at one more factor of the LR (BEiT, timm).",
                                 "1 (off) or a factor in (0, 1), e.g. 0.75", _within(0, 1, low_open=True)),
    "train.epochs": Key(10, "Epochs of training.", "a positive number of epochs", _at_least(1),
                        read_by=_all_but("gradual")),
    "train.batch_size": Key(32, "The global batch, over every device of every process.",
                            "a positive number of images", _at_least(1)),
    "train.bf16": Key(False, "Compute in bfloat16 (parameters and optimizer state stay float32)."),
    "train.checkpoint_every_steps": Key(0, "Also checkpoint every this many steps (0: only at epoch ends).",
                                        "0 (epoch ends only) or a positive number of steps", _at_least(0)),
    "train.checkpoint_every_minutes": Key(0.0, "And/or every this many minutes (0: off).",
                                          "0 (off) or a positive number of minutes", lambda v: _number(v) and v >= 0),
    "train.skip_nonfinite": Key(False, "False: a non-finite loss stops the run; True: such steps are skipped and "
                                "counted."),
    "train.resume_on_changed_data": Key(False, "False: resuming on other data than the run started with is an "
                                        "error."),
    "train.ema_decay": Key(0.0, "> 0: the moving average of the weights is the run's model (e.g. 0.999).",
                           "0 (off) or a decay in (0, 1), e.g. 0.999", _within(0, 1, high_open=True)),
    "train.ema_warmup": Key(True, "The EMA's decay warmed up as timm's: min(decay, (1 + step) / (10 + step)).",
                            read_by=_all_but("linear_probe")),
    "train.accumulate_steps": Key(1, "Each batch computed in this many micro-batches (less memory, the same "
                                  "update).", "a positive number of micro-batches", _at_least(1)),
    "train.class_weights": Key("none", "balanced: loss weights n / (classes * count) from the train split.",
                               f"choose from {', '.join(CLASS_WEIGHTS)}", _one_of(*CLASS_WEIGHTS)),
    "train.early_stopping_patience": Key(0, "Stop after this many epochs without a better val accuracy (0: off).",
                                         "0 (off) or a number of epochs", _at_least(0)),
    "eval.threshold": Key(None, "multi_label: the probability at which a label is predicted, for every class; "
                          "None: per class, the threshold of the best F1 on val (0.5 without a val split).",
                          "None (per class, chosen on val) or a probability in (0, 1)",
                          lambda v: v is None or _within(0, 1, low_open=True, high_open=True)(v)),
    "eval.tta": Key("none", "flip: evaluation and prediction average each image's logits with its mirror's.",
                    f"choose from {', '.join(TTA)}", _one_of(*TTA)),
}


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads at its default (`KEYS`); `jaxtl.train.run.keys_read` says which run reads which."""
    c = ml_collections.ConfigDict()
    for name, key in KEYS.items():
        *parents, leaf = name.split(".")
        node = c
        for part in parents:
            if part not in node:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        node[leaf] = key.default.copy_and_resolve_references() if isinstance(
            key.default, ml_collections.ConfigDict) else key.default
    return c


# ---------------------------------------------------------------------------------------------------------------
# Loading and overriding


def load_config(spec: str | Path) -> ml_collections.ConfigDict:
    """Runs `get_config()` of a config file, or `get_config(arg)` for `path.py:arg`."""
    path_text, _, arg = str(spec).partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise MissingFileError(f"config file '{path}' does not exist")
    module_spec = importlib.util.spec_from_file_location(f"jaxtl_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file '{path}' has no get_config() function")
    config = module.get_config(arg) if arg else module.get_config()
    check_keys(config, base_config(), str(spec))
    return config


def with_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the parts of the fine-tuning recipe that measured as helping at the configs' budgets (a few
    epochs on small data; docs/measured/strategies.md): TrivialAugment (`data.augment.policy`) and flip test-time
    augmentation where training flips. Left out, as measured on sign language at 3 epochs: layer-wise LR decay 0.75
    (8-12 points of test accuracy lost: the lower layers barely move), Mixup 0.2 (4-5 points), EMA and stochastic
    depth (within two test images either way); they remain keys to set for long schedules."""
    config.data.augment.policy = "trivialaugment"
    if config.data.augment.flip:
        config.eval.tta = "flip"
    return config


def check_variant(arg: str, variants: Sequence[str], source: str) -> str:
    """For config files: `arg` if it names one of `variants`, else an error listing them."""
    if arg not in variants:
        raise ConfigError(f"{source}: unknown variant '{arg}'; choose one of {', '.join(variants)} "
                          f"(--config {source}:VARIANT)")
    return arg


def check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, source: str, prefix="") -> None:
    """Every key of `config` must exist in `reference` (except under free-form `model.kwargs`)."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in reference:
            raise ConfigError(_unknown_key_message(name, reference, prefix, source))
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
            raise ConfigError(f"config override '{override}' must be KEY=VALUE, e.g. train.epochs=3")
        key, text = override.split("=", 1)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        set_value(config, key, value, "--config")
    return config


def set_value(config: ml_collections.ConfigDict, key: str, value: Any, source: str) -> None:
    """`config[key] = value` for a dotted key that must exist (except under `model.kwargs`); lists become tuples
    where the key holds a tuple."""
    *parents, leaf = key.split(".")
    node, prefix = config, ""
    for part in parents:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ConfigError(_unknown_key_message(prefix + part, node, prefix, source))
        node, prefix = node[part], f"{prefix}{part}."
    if leaf not in node and key.rsplit(".", 1)[0] != "model.kwargs":
        raise ConfigError(_unknown_key_message(key, node, prefix, source))
    if isinstance(node.get(leaf), tuple) and isinstance(value, list):
        value = _tuples(value)
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"{source}.{key}={value!r}: {e}") from None


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """`{dotted key: value}` of every leaf; `model.kwargs` counts as one leaf (a dict)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and name != "model.kwargs":
            out |= leaves(value, f"{name}.")
        else:
            out[name] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    return out


def plain(value: Any) -> Any:
    """A comparable copy: sequences as lists, mappings sorted."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in sorted(value.items())}
    return value


def set_keys(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keys set to something other than their default, with their values."""
    defaults = leaves(base_config())
    return {key: value for key, value in leaves(config).items() if plain(value) != plain(defaults.get(key))}


# ---------------------------------------------------------------------------------------------------------------
# Values


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r}: {allowed}")


def check_values(config: ml_collections.ConfigDict) -> None:
    """Every value against what its declaration allows (`KEYS`), then the rules between keys; the first bad one is
    an error naming key, value and what is allowed. What needs the model (layer names, rules against the parameter
    paths) is checked by the plan (`jaxtl.train.plan.check_model`), `auto`'s candidates by `jaxtl.advice.auto`."""
    values = leaves(config)
    for name, key in KEYS.items():
        if key.check is not None and not key.check(values[name]):
            _fail(name, values[name], key.allowed)
    d, tr = config.data, config.train
    relations = [
        ("data.path", d.source != "folder" or bool(d.path), "set it to a folder of class sub-folders"),
        ("data.path", d.source != "manifest" or bool(d.path), "set it to a .csv or .jsonl file of paths and labels"),
        ("data.name", d.source != "tfds" or bool(d.name), "set it to a tensorflow-datasets name, e.g. tf_flowers"),
        ("data.multi_label", d.source in ("manifest", "hf") or not d.multi_label, "several labels an image are read "
         "from a manifest (data.source='manifest') or a Hugging Face dataset (data.source='hf')"),
        ("data.name", d.source != "hf" or bool(d.name), "set it to a Hugging Face dataset name or a save_to_disk "
         "folder"),
        ("data.test_fraction", d.val_fraction + d.test_fraction < 1,
         f"with data.val_fraction={d.val_fraction} leaves no training images; their sum must be below 1"),
        *((f"data.augment.{key}", d.augment.policy == "randaugment" or d.augment[key] == KEYS[
            f"data.augment.{key}"].default, f"is RandAugment's; data.augment.policy='{d.augment.policy}' does not read "
           "it: remove it or set data.augment.policy='randaugment'") for key in ("magnitude", "num_ops")),
        *((f"data.augment.{key}", d.augment.enabled or d.augment[key] in ("none", 0),
           "needs data.augment.enabled=True (augmentation is off): remove it or turn augmentation on")
          for key in ("policy", "color_jitter", "random_erasing")),
        ("train.accumulate_steps", tr.batch_size % tr.accumulate_steps == 0,
         f"must divide train.batch_size={tr.batch_size} (each micro-batch is batch_size / accumulate_steps)"),
    ]
    for name, ok, allowed in relations:
        if not ok:
            _fail(name, values[name], allowed)


# ---------------------------------------------------------------------------------------------------------------
# The resolved config of a run


CONFIG_FILE = "config.json"


def to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def save_resolved(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Writes `workdir/config.json`: the config the run trains with (after overrides and `auto`'s advice)."""
    write_json_atomic(Path(workdir) / CONFIG_FILE, to_dict(config))


def config_from_dict(values: dict, source: str) -> ml_collections.ConfigDict:
    """A config from `to_dict` output: every key set into `base_config()` (JSON lists become tuples)."""
    config = base_config()

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and name != "model.kwargs":
                walk(value, f"{name}.")
            elif name == "model.kwargs":
                config.model.kwargs = ml_collections.ConfigDict({k: _tuples(v) for k, v in value.items()})
            else:
                set_value(config, name, _tuples(value) if isinstance(value, list) else value, source)

    walk(values, "")
    return config


def load_resolved(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a run in `workdir` trained with."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} not found: `train` writes it when it starts; run `train` with --workdir "
                               f"{workdir} first")
    fix = ("it is the run's resolved config; restore it from a copy (or write the config you started the run "
           "with), or train in a new --workdir")
    values = read_json(path, fix)
    try:
        return config_from_dict(values, str(path))
    except (ValueError, TypeError, AttributeError) as e:  # JSON, but not a config's
        raise RunFileError(f"{path} is damaged ({damage_reason(e)}); {fix}") from None


def differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict, ignore=("progress",)) -> list[str]:
    """`key: a -> b` for every leaf that differs (other than `ignore`)."""
    la, lb = leaves(a), leaves(b)
    return [f"{k}: {la.get(k)!r} -> {lb.get(k)!r}" for k in sorted(set(la) | set(lb))
            if k not in ignore and plain(la.get(k)) != plain(lb.get(k))]
