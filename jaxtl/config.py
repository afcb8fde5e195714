"""Run configs: `ml_collections.ConfigDict`s from `configs/*.py` files, overridden by `KEY=VALUE` flags.

Every config starts from `base_config()`, which holds every key a run reads, so a misspelled key in a file or on
the command line is an error naming it, and a value of the wrong type is an error too. A config file's
`get_config(arg)` takes big_vision's variant argument: `--config configs/ants_bees.py:finetune_top`.

Before any work, `check_values` checks every value (each error names the key, the value and what is allowed);
which keys a run reads, and so which set keys it would ignore (an error), is the plan's to say
(`jaxtl.train.plan`), from what each trainer declares. A run writes its resolved config (`save_resolved`) beside
its checkpoints; `eval` and `predict --workdir` read it back (`load_resolved`).

The config is read at the top (the commands, `auto`, the plan of a run); below that only the parts it resolved to
travel (the layers say so, `.importlinter`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from jaxtl.core.atomic import damage_reason, read_json, write_json_atomic
from jaxtl.core.errors import ConfigError, MissingFileError, RunFileError
from jaxtl.data.augment import BINS, POLICIES, Policy
from jaxtl.data.images import DEFAULT_MAX_PIXELS
from jaxtl.transfer.recipe import CLASS_WEIGHTS, TTA
from jaxtl.transfer.optimizer import OPTIMIZERS
from jaxtl.transfer.strategies import STRATEGIES

DEFAULT_DECAY_RULES = ((".*/kernel", True), (".*", False))  # weight decay on kernels only


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every key a run reads; `jaxtl.train.plan.keys_read` says which run reads which."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress = True  # progress bars
    c.model = dict(
        name="efficientnet_lite0",
        weights="default",  # "default", a registered id, a .pth/.safetensors path, or None (random init)
        kwargs=ml_collections.ConfigDict(),  # backbone build arguments (drop_path_rate, ...)
        reinit=(),  # regexes over parameter paths initialised afresh instead of loaded (big_vision's dont_load)
    )
    c.data = dict(
        source="folder",  # folder | tfds
        path="", download_url="",  # folder: where it is; a zip archive to fetch if it is missing
        name="", tfds_data_dir="", tfds_download=True,  # tfds: dataset name, data_dir (default $JAXTL_DATA_DIR/tfds)
        val_fraction=0.2,  # carved from train when there is no val split (seeded, stratified)
        test_fraction=0.0,  # carved from train when a folder has no split folders at all
        skip_bad_images=False,  # False: an unreadable image is an error naming it; True: skipped and counted
        max_image_pixels=DEFAULT_MAX_PIXELS,  # larger images are refused (decompression bombs)
        exif_orientation=True,  # turn photos upright by their EXIF orientation tag (as photo viewers do)
        input_size=0,  # 0: the weights' own input size
        augment=dict(enabled=True, crop_scale=(0.08, 1.0), flip=True,
                     mixup=0.0, cutmix=0.0,  # Beta alphas of Mixup / CutMix on the device (0: off; timm's 0.8, 1.0)
                     mix_switch_prob=0.5,  # both on: the chance a batch is CutMixed rather than Mixup'd
                     # on the device, per image (jaxtl.data.augment): none | randaugment | trivialaugment,
                     policy="none", magnitude=9, num_ops=2,  # RandAugment's magnitude bin (0-30) and operations
                     color_jitter=0.0,  # brightness, contrast, saturation strength (timm's 0.4; 0: off)
                     random_erasing=0.0),  # the chance an image gets a box of noise (timm's reprob 0.25; 0: off)
        workers=0,  # 0: decode in threads; N: in N worker processes (many-core hosts; a few seconds to start)
        decoded_cache=False,  # decode every image once into a memory-mapped uint8 cache; later epochs read it
        decoded_cache_side=0,  # the train split's stored shorter side (0: the resize size; e.g. 224 caps ImageNet)
    )
    c.head = dict(
        layers=("pre_logits",),  # backbone features the classifier reads, pooled and concatenated
        hidden=0,  # 0: linear head; >0: an MLP head with this many hidden units
        dropout=None,  # before the classifier; None: the backbone's own (0.2 for EfficientNet-Lite0)
        knn=0,  # linear_probe: > 0: no fit, a cosine vote of the k most similar cached train features (kNN probe)
    )
    c.transfer = dict(
        # auto | linear_probe | finetune_top | finetune_all | discriminative | gradual | norm_only | bitfit | lora
        # | vpt | scratch | custom
        strategy="linear_probe",
        num_stages=1,  # finetune_top: how many of the last groups train
        lr_ratio=0.01,  # discriminative: first group's LR / head's LR
        lora_rank=8, lora_alpha=16.0,  # lora: the factors' rank and scale (the branch is alpha / rank * x A B)
        lora_targets=(),  # lora: regexes over kernel paths; (): the family's (ViT attention + MLP, CNN 1x1 convs)
        vpt_prompts=10, vpt_deep=False,  # vpt (ViTs): prompt tokens; False: before the first block, True: every block
        phase_epochs=(),  # gradual: epochs of each phase (head, +last group, ...); the run's epochs are their sum
        rules=(),  # custom: ((regex, LR multiplier), ...) over parameter paths, first match wins, 0 freezes
        train_frozen_bn=False,  # False (Keras rule): frozen BatchNorm layers keep their ImageNet statistics
        cached_maps=False,  # finetune_top, gradual (CNNs): the frozen groups once per image, the top trains on
        # their cached maps; flip of the maps is the only augmentation kept (crops, policies, mixing are lost)
        cached_maps_gb=8.0,  # cached_maps: the train split's maps past this size: a seeded stratified subset
        auto_budget_minutes=10.0,  # auto: time for trying the candidates (probes take seconds); 0: no trials
        auto_candidates=(),  # auto: try these (probe_pre_logits, ..., finetune_all); () the matrix cell's
        auto_trial_epochs=3,  # auto: the short schedule every fine-tuning trial runs
    )
    c.features = dict(
        cache=True,  # linear_probe: train the head on cached backbone features (no augmentation)
        cache_dir="",  # default $JAXTL_CACHE_DIR/features
    )
    c.probe = dict(  # the logistic-regression head on cached features (linear_probe, head.hidden=0)
        l2_grid=(),  # L2 strengths tried, best val accuracy kept; () = 19 values 1e-6..1e3
        max_iter=1000,  # L-BFGS iterations per L2 strength
    )
    c.optimizer = dict(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, decay_rules=DEFAULT_DECAY_RULES,
                       warmup_epochs=1.0, label_smoothing=0.1,
                       layer_decay=1.0)  # < 1: each block below the head at one more factor of the LR (BEiT, timm)
    c.train = dict(
        epochs=10, batch_size=32, bf16=False,
        checkpoint_every_steps=0,  # also checkpoint every this many steps (0: only at epoch ends)
        checkpoint_every_minutes=0.0,  # and/or every this many minutes (0: off)
        skip_nonfinite=False,  # False: a non-finite loss stops the run; True: such steps are skipped and counted
        resume_on_changed_data=False,  # False: resuming on data other than the run started with is an error
        ema_decay=0.0,  # > 0: the moving average of the weights is the run's model (e.g. 0.999); 0: off
        ema_warmup=True,  # the EMA's decay warmed up as timm's: min(decay, (1 + step) / (10 + step))
        accumulate_steps=1,  # each batch computed in this many micro-batches (less memory, the same update)
        class_weights="none",  # none | balanced (loss weights n / (classes * count) from the train split)
        early_stopping_patience=0,  # stop after this many epochs without a better val accuracy (0: off)
    )
    c.eval = dict(
        tta="none",  # none | flip: evaluation and prediction average each image's logits with its mirror's
    )
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
    """`config` with the fine-tuning recipe the configs' `*_recipe` variants use, sized for a few epochs on small
    data: stochastic depth 0.1, an EMA of the weights (0.998, warmed up), light Mixup (0.2), layer-wise LR decay
    0.75 and flip test-time augmentation where training flips (label smoothing 0.1 is the default already)."""
    config.model.kwargs.drop_path_rate = 0.1
    config.train.ema_decay = 0.998
    config.data.augment.mixup = 0.2
    config.optimizer.layer_decay = 0.75
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
    """Every value against what is allowed; the first bad one is an error naming key, value and the allowed range.
    What needs the model (layer names, rules against parameter paths) is checked by the plan
    (`jaxtl.train.plan.check_model`), `auto`'s own keys by `jaxtl.advice.auto`."""
    d, t, o, tr = config.data, config.transfer, config.optimizer, config.train
    checks = [
        ("data.source", d.source in ("folder", "tfds"), "choose 'folder' or 'tfds'"),
        ("data.path", d.source != "folder" or bool(d.path), "set it to a folder of class sub-folders"),
        ("data.name", d.source != "tfds" or bool(d.name), "set it to a tensorflow-datasets name, e.g. tf_flowers"),
        ("data.val_fraction", 0 <= d.val_fraction < 1, "must be in [0, 1)"),
        ("data.test_fraction", 0 <= d.test_fraction < 1, "must be in [0, 1)"),
        ("data.test_fraction", d.val_fraction + d.test_fraction < 1,
         f"with data.val_fraction={d.val_fraction} leaves no training images; their sum must be below 1"),
        ("data.max_image_pixels", _int(d.max_image_pixels) and d.max_image_pixels >= 1, "must be a positive integer"),
        ("data.workers", _int(d.workers) and d.workers >= 0, "0 (threads) or a number of worker processes"),
        ("data.decoded_cache_side", _int(d.decoded_cache_side) and (d.decoded_cache_side == 0
                                                                    or 32 <= d.decoded_cache_side <= 4096),
         "0 (the preprocessing's resize size) or an image side from 32 to 4096"),
        ("data.input_size", _int(d.input_size) and (d.input_size == 0 or 32 <= d.input_size <= 4096),
         "0 (the weights' own size) or an image side from 32 to 4096"),
        ("data.augment.crop_scale", _pair(d.augment.crop_scale) and 0 < d.augment.crop_scale[0]
         <= d.augment.crop_scale[1] <= 1, "a (min, max) area fraction with 0 < min <= max <= 1"),
        ("head.hidden", _int(config.head.hidden) and config.head.hidden >= 0, "0 (linear head) or a hidden width"),
        ("head.dropout", config.head.dropout is None or (isinstance(config.head.dropout, (int, float))
                          and 0 <= config.head.dropout < 1),
         "None (the backbone's own) or a rate in [0, 1)"),
        ("transfer.strategy", t.strategy in (*STRATEGIES, "auto"), f"choose from {', '.join(STRATEGIES)} or auto"),
        ("transfer.num_stages", _int(t.num_stages) and t.num_stages >= 1, "a positive number of groups"),
        ("transfer.lr_ratio", 0 < t.lr_ratio <= 1, "must be in (0, 1] (first group's LR / head's LR)"),
        ("transfer.lora_rank", _int(t.lora_rank) and t.lora_rank >= 1, "a positive rank, e.g. 8"),
        ("transfer.lora_alpha", _number(t.lora_alpha) and t.lora_alpha > 0, "a positive scale numerator, e.g. 16"),
        ("transfer.vpt_prompts", _int(t.vpt_prompts) and t.vpt_prompts >= 0,
         "a number of prompt tokens, e.g. 10 (0: the pretrained ViT unchanged)"),
        ("transfer.vpt_deep", isinstance(t.vpt_deep, bool), "True (prompts at every block) or False (the first)"),
        ("transfer.cached_maps", isinstance(t.cached_maps, bool),
         "True (train the top on cached maps of the frozen part) or False (on images)"),
        ("transfer.cached_maps_gb", _number(t.cached_maps_gb) and t.cached_maps_gb > 0, "a positive size in GB"),
        ("transfer.lora_targets", all(isinstance(p, str) for p in t.lora_targets),
         "regexes over kernel paths, e.g. ('backbone/stage4/.*/kernel',), or () for the family's default"),
        ("transfer.phase_epochs", all(_int(n) and n >= 1 for n in t.phase_epochs),
         "positive epoch counts, one per phase, e.g. (2, 2, 3)"),
        ("transfer.auto_budget_minutes", t.auto_budget_minutes >= 0, "0 (no trials) or a number of minutes"),
        ("transfer.auto_trial_epochs", _int(t.auto_trial_epochs) and t.auto_trial_epochs >= 1,
         "a positive number of epochs"),
        ("probe.l2_grid", all(isinstance(v, (int, float)) and v > 0 for v in config.probe.l2_grid),
         "positive L2 strengths, e.g. (1e-3, 1e-2, 1e-1), or () for the default grid"),
        ("probe.max_iter", _int(config.probe.max_iter) and config.probe.max_iter >= 1, "a positive iteration count"),
        ("optimizer.name", o.name in OPTIMIZERS, f"choose from {', '.join(OPTIMIZERS)}"),
        ("optimizer.lr", o.lr > 0, "must be positive"),
        ("optimizer.momentum", 0 <= o.momentum < 1, "must be in [0, 1)"),
        ("optimizer.weight_decay", o.weight_decay >= 0, "must be >= 0"),
        ("optimizer.warmup_epochs", o.warmup_epochs >= 0, "must be >= 0"),
        ("optimizer.label_smoothing", 0 <= o.label_smoothing < 1, "must be in [0, 1)"),
        ("optimizer.layer_decay", _number(o.layer_decay) and 0 < o.layer_decay <= 1,
         "1 (off) or a factor in (0, 1), e.g. 0.75"),
        ("train.epochs", _int(tr.epochs) and tr.epochs >= 1, "a positive number of epochs"),
        ("train.batch_size", _int(tr.batch_size) and tr.batch_size >= 1, "a positive number of images"),
        ("train.checkpoint_every_steps", _int(tr.checkpoint_every_steps) and tr.checkpoint_every_steps >= 0,
         "0 (epoch ends only) or a positive number of steps"),
        ("train.checkpoint_every_minutes", tr.checkpoint_every_minutes >= 0, "0 (off) or a positive number of minutes"),
        ("data.augment.mixup", _number(d.augment.mixup) and d.augment.mixup >= 0, "0 (off) or a Beta alpha, e.g. 0.8"),
        ("data.augment.cutmix", _number(d.augment.cutmix) and d.augment.cutmix >= 0,
         "0 (off) or a Beta alpha, e.g. 1.0"),
        ("data.augment.mix_switch_prob", _number(d.augment.mix_switch_prob) and 0 <= d.augment.mix_switch_prob <= 1,
         "a probability in [0, 1]"),
        ("data.augment.policy", d.augment.policy in POLICIES, f"choose from {', '.join(POLICIES)}"),
        ("data.augment.magnitude", _int(d.augment.magnitude) and 0 <= d.augment.magnitude < BINS,
         f"a magnitude bin from 0 to {BINS - 1} (torchvision's RandAugment; 9 is its default)"),
        ("data.augment.num_ops", _int(d.augment.num_ops) and d.augment.num_ops >= 0,
         "a number of operations per image (RandAugment's N, 2 by default)"),
        *((f"data.augment.{key}", d.augment.policy == "randaugment" or d.augment[key] == default,
           f"is RandAugment's; data.augment.policy='{d.augment.policy}' does not read it: remove it or set "
           "data.augment.policy='randaugment'") for key, default in (("magnitude", Policy().magnitude),
                                                                       ("num_ops", Policy().num_ops))),
        ("data.augment.color_jitter", _number(d.augment.color_jitter) and 0 <= d.augment.color_jitter <= 1,
         "0 (off) or a strength up to 1, e.g. 0.4"),
        ("data.augment.random_erasing", _number(d.augment.random_erasing) and 0 <= d.augment.random_erasing <= 1,
         "0 (off) or a probability, e.g. 0.25"),
        *((f"data.augment.{key}", d.augment.enabled or d.augment[key] in ("none", 0),
           "needs data.augment.enabled=True (augmentation is off): remove it or turn augmentation on")
          for key in ("policy", "color_jitter", "random_erasing")),
        ("train.ema_decay", _number(tr.ema_decay) and 0 <= tr.ema_decay < 1,
         "0 (off) or a decay in (0, 1), e.g. 0.999"),
        ("train.accumulate_steps", _int(tr.accumulate_steps) and tr.accumulate_steps >= 1,
         "a positive number of micro-batches"),
        ("train.accumulate_steps", not _int(tr.accumulate_steps) or tr.accumulate_steps < 1  # (the check above)
         or tr.batch_size % tr.accumulate_steps == 0,
         f"must divide train.batch_size={tr.batch_size} (each micro-batch is batch_size / accumulate_steps)"),
        ("train.class_weights", tr.class_weights in CLASS_WEIGHTS, f"choose from {', '.join(CLASS_WEIGHTS)}"),
        ("train.early_stopping_patience", _int(tr.early_stopping_patience) and tr.early_stopping_patience >= 0,
         "0 (off) or a number of epochs"),
        ("eval.tta", config.eval.tta in TTA, f"choose from {', '.join(TTA)}"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            _fail(key, leaves(config)[key], allowed)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pair(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2


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
