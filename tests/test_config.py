"""Configs: variants, overrides, every value checked before any work, no key set where the run never reads it,
and the resolved config a run writes."""

import ast
import re

import pytest

from jaxtl.advice import auto
from jaxtl.config import (apply_overrides, base_config, config_from_dict, leaves, load_config, load_resolved,
                          save_resolved, to_dict)
from jaxtl.core.errors import ConfigError
from jaxtl.train.run import check_config, keys_read, unread_keys
from tests.conftest import REPO


def _variants(path):
    module = ast.parse(path.read_text())
    for node in module.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "VARIANTS":
            return ast.literal_eval(node.value)
    return (None,)


CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))
SPECS = [f"configs/{p.name}" + (f":{v}" if v else "") for p in CONFIG_FILES for v in _variants(p)]


@pytest.mark.parametrize("spec", SPECS)
def test_every_config_and_variant_is_valid_and_documented(spec):
    config = load_config(REPO / spec)
    # values, nothing set that the run never reads, layers, rules and weights against the model
    auto.check(config) if config.transfer.strategy == "auto" else check_config(config)
    path = spec.split(":")[0]
    docstring = ast.get_docstring(ast.parse((REPO / path).read_text())) or ""
    assert f"run.py train --config {path}" in docstring, f"{path}: docstring lacks its command"
    variant = spec.partition(":")[2]
    assert not variant or f"`{variant}`" in docstring, f"{spec}: variant not described in the docstring"


def test_unknown_variant_lists_the_variants():
    with pytest.raises(ConfigError, match=r"unknown variant 'finetune'; choose one of linear_probe, finetune_top"):
        load_config(REPO / "configs/ants_bees.py:finetune")


def test_overrides_apply_and_parse_literals():
    config = apply_overrides(base_config(), ["train.epochs=3", "optimizer.lr=1e-3", "transfer.strategy=linear_probe",
                                             "data.augment.crop_scale=(0.5, 1.0)", "model.kwargs.width=8",
                                             "transfer.rules=[('head/.*', 1.0), ('.*', 0.0)]"])
    assert config.train.epochs == 3 and config.optimizer.lr == 1e-3
    assert config.transfer.strategy == "linear_probe" and config.data.augment.crop_scale == (0.5, 1.0)
    assert config.model.kwargs.width == 8 and config.transfer.rules == (("head/.*", 1.0), (".*", 0.0))


@pytest.mark.parametrize("override,match", [
    ("train.epoch=3", r"unknown config key 'train.epoch'; did you mean 'train.epochs'"),
    ("trian.epochs=3", r"unknown config key 'trian'"),
    ("train.epochs", "must be KEY=VALUE"),
    ("train.epochs=three", "train.epochs='three'"),
    ("train.batch_size=2.5", "train.batch_size=2.5"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(base_config(), [override])


def test_misspelled_key_in_a_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from jaxtl.config import base_config\n"
                    "def get_config():\n    c = base_config()\n    c.optimizer.learning_rate = 0.1\n    return c\n")
    with pytest.raises(ConfigError, match=r"bad.py: unknown config key 'optimizer.learning_rate'"):
        load_config(path)


def _finetune(**values):
    config = load_config(REPO / "configs/ants_bees.py:finetune_top")
    return apply_overrides(config, [f"{k}={v!r}" for k, v in values.items()])


@pytest.mark.parametrize("key,value,allowed", [
    ("train.batch_size", 0, "a positive number of images"),
    ("train.batch_size", -4, "a positive number of images"),
    ("train.epochs", 0, "a positive number of epochs"),
    ("optimizer.lr", -1.0, "must be positive"),
    ("optimizer.momentum", 1.5, r"must be in \[0, 1\)"),
    ("optimizer.name", "adam", "choose from sgd, adamw"),
    ("data.val_fraction", 1.5, r"must be in \[0, 1\)"),
    ("data.input_size", 7, "an image side from 32 to 4096"),
    ("data.decoded_cache_side", 16, "an image side from 32 to 4096"),
    ("data.augment.crop_scale", (0.9, 0.2), "0 < min <= max <= 1"),
    ("data.sampler", "weighted", "choose from uniform, balanced"),
    ("data.source", "csv", "choose 'folder', 'tfds', 'manifest' or 'hf'"),
    ("data.max_image_pixels", 0, "a positive integer"),
    ("head.dropout", 1.0, r"a rate in \[0, 1\)"),
    ("transfer.strategy", "linear", "choose from linear_probe, finetune_top"),
    ("train.accumulate_steps", 0, "a positive number of micro-batches"),
    ("train.accumulate_steps", 3, "must divide train.batch_size=32"),
    ("transfer.auto_candidates", ("probe",), "a list of candidate names: probe_pre_logits, probe_earlier"),
    ("transfer.auto_models", ("mobilenet_v3",), r"a list of registered model names \(.*mobilenet_v2"),
    ("transfer.auto_models", ("mobilenet_v2", "mobilenet_v2=default"), "each backbone once"),
])
def test_bad_values_are_errors_naming_key_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(ConfigError, match=re.escape(f"{key}={value!r}: ") + ".*" + allowed):
        check_config(_finetune(**{key: value}))


@pytest.mark.parametrize("values,message", [
    ({"transfer.num_stages": 9}, r"transfer.num_stages=9: finetune_top trains the last 1..5 groups"),
    ({"head.layers": ("stage9",)}, r"head.layers=\['stage9'\]: choose one or more distinct features"),
    ({"optimizer.decay_rules": (("nothing", True), (".*", False))}, r"optimizer.decay_rules: rule\(s\) \['nothing'\]"),
    ({"model.kwargs.widht": 8}, r"model.kwargs \['widht'\]: efficientnet_lite0 does not take"),
    ({"model.weights": "missing.pth"}, "weights 'missing.pth' is neither a registered weights id"),
])
def test_what_needs_the_model_is_checked_before_any_work(values, message):
    config = _finetune(**values)
    with pytest.raises(Exception, match=message):
        check_config(config)


def test_custom_rules_are_checked_against_the_parameters():
    config = _finetune(**{"transfer.strategy": "custom", "transfer.rules": (("head/.*", 1.0),)})
    config.transfer.num_stages = 1  # custom does not read it
    with pytest.raises(ConfigError, match=r"transfer.rules: no rule matches backbone/.* \(147 in all\)"):
        check_config(config)


@pytest.mark.parametrize("spec,values,unread", [
    ("ants_bees.py", {"optimizer.lr": 0.1, "train.epochs": 3}, ["optimizer.lr", "train.epochs"]),
    ("ants_bees.py", {"data.augment.flip": False}, ["data.augment.flip"]),
    ("ants_bees.py:gradual", {"train.epochs": 4}, ["train.epochs"]),
    ("ants_bees.py:finetune_top", {"transfer.lr_ratio": 0.1, "probe.max_iter": 5}, ["probe.max_iter", "transfer.lr_ratio"]),
    ("ants_bees.py:finetune_top", {"optimizer.name": "adamw", "optimizer.momentum": 0.5}, ["optimizer.momentum"]),
    ("ants_bees.py:scratch", {"model.reinit": ("backbone/stem/.*",)}, ["model.reinit"]),
    ("ants_bees.py", {"train.checkpoint_every_steps": 10}, ["train.checkpoint_every_steps"]),  # an L-BFGS fit
    ("ants_bees.py", {"data.sampler": "balanced"}, ["data.sampler"]),  # a fit on all the features at once
])
def test_keys_the_run_never_reads_are_errors(spec, values, unread):
    config = apply_overrides(load_config(REPO / "configs" / spec), [f"{k}={v!r}" for k, v in values.items()])
    assert sorted(unread_keys(config)) == sorted(unread)
    with pytest.raises(ConfigError, match=rf"{unread[0]}=.*: set, but .* never reads"):
        check_config(config)


def test_the_cached_mlp_head_reads_the_optimizer_and_auto_decides_later():
    config = apply_overrides(load_config(REPO / "configs/ants_bees.py"), ["head.hidden=64", "optimizer.lr=0.1",
                                                                          "train.epochs=3"])
    assert {"optimizer.lr", "train.epochs", "head.dropout"} <= keys_read(config)
    check_config(config)
    chosen_later = apply_overrides(load_config(REPO / "configs/ants_bees.py:finetune_top"), ["transfer.strategy=auto"])
    auto.check(chosen_later)  # auto may choose any path: keys it does not read then only warn


@pytest.mark.parametrize("strategy", ["linear_probe", "finetune_top", "finetune_all", "discriminative", "gradual",
                                      "norm_only", "bitfit", "lora", "scratch", "custom"])
def test_what_a_run_reads_is_what_its_plan_reads(strategy):
    """`keys_read` records the plan's readers: reading the same config twice gives the same keys, a key the
    strategy's own settings need is among them, and the recording view cannot be written to."""
    needs = {"gradual": {"transfer.phase_epochs": (1, 1)}, "custom": {"transfer.rules": ((".*", 1.0),)}}
    config = _finetune(**{"transfer.strategy": strategy, **needs.get(strategy, {})})
    read = keys_read(config)
    assert read == keys_read(config) and "transfer.strategy" in read
    own = {"finetune_top": "transfer.num_stages", "discriminative": "transfer.lr_ratio",
           "gradual": "transfer.phase_epochs", "custom": "transfer.rules"}
    assert (own.get(strategy) in read) if strategy in own else not (set(own.values()) & read)
    assert ("model.reinit" in read) == (strategy != "scratch")  # scratch loads nothing to leave out


# What a strategy's runs read besides its defaults: each of these on top of each strategy (with what the strategy
# needs: a ViT for vpt, phases for gradual, rules for custom), where the config takes the combination.
_NEEDS = {"vpt": {"model.name": "vit_ti16"}, "gradual": {"transfer.phase_epochs": (1, 1)},
          "custom": {"transfer.rules": ((".*", 1.0),)}}
_SCENARIOS = ({}, {"transfer.cached_maps": True}, {"head.hidden": 16}, {"head.knn": 5}, {"features.cache": False},
              {"data.augment.policy": "randaugment"}, {"data.decoded_cache": True}, {"model.name": "vit_s16"},
              {"data.source": "tfds", "data.name": "tf_flowers"}, {"data.source": "hf", "data.name": "beans"},
              {"data.source": "manifest", "data.path": "pairs.csv", "data.multi_label": True},
              {"data.augment.mixup": 0.2, "data.augment.cutmix": 1.0}, {"train.ema_decay": 0.99})


def test_each_key_declares_exactly_the_strategies_that_read_it():
    """`KEYS[key].read_by` against what the readers read: every strategy a key declares reads it under some
    settings, and (`keys_read` refuses the rest) no strategy reads a key that leaves it out; every key is read by
    some strategy or `auto`."""
    from jaxtl.config import KEYS
    from jaxtl.core.errors import JaxtlError
    from jaxtl.transfer.strategies import STRATEGIES

    read_by: dict[str, set[str]] = {key: set() for key in KEYS}
    for strategy in STRATEGIES:
        for scenario in _SCENARIOS:
            values = {"transfer.strategy": strategy} | _NEEDS.get(strategy, {}) | scenario
            try:
                config = apply_overrides(base_config(), [f"{k}={v!r}" for k, v in values.items()])
                read = keys_read(config)
            except JaxtlError:  # a combination the config refuses (a kNN head that fine-tunes)
                continue
            for key in read:
                read_by[key].add(strategy)
    for key in auto.AUTO_KEYS:
        read_by[key].add("auto")
    declared = {key: {s for s in (*STRATEGIES, "auto") if KEYS[key].read_by_strategy(s)} for key in KEYS}
    assert {key: sorted(s) for key, s in read_by.items() if s != declared[key]} == {}
    assert set(auto.AUTO_KEYS) == {"transfer.auto_budget_minutes", "transfer.auto_candidates", "transfer.auto_models",
                                   "transfer.auto_trial_epochs", "features.cache", "features.cache_dir",
                                   "probe.l2_grid"}


def test_a_reader_of_a_key_its_declaration_leaves_out_is_refused(monkeypatch):
    """A trainer that starts reading a key without its declaration saying so fails at once (a bug: the unread-key
    check and the reference would not know), and a declared key set for a strategy that does not read it is the
    user's error naming it."""
    import dataclasses

    from jaxtl.config import KEYS

    config = _finetune(**{"transfer.strategy": "finetune_top"})
    monkeypatch.setitem(KEYS, "transfer.num_stages", dataclasses.replace(KEYS["transfer.num_stages"],
                                                                         read_by=("discriminative",)))
    with pytest.raises(RuntimeError, match=r"'finetune_top' reads transfer.num_stages, .* add the strategy"):
        keys_read(config)
    monkeypatch.undo()
    config = _finetune(**{"transfer.strategy": "finetune_all", "transfer.num_stages": 2})
    with pytest.raises(ConfigError, match=r"transfer.num_stages=2: set, but transfer.strategy='finetune_all'"):
        check_config(config)


def test_resolved_config_round_trips(tmp_path):
    config = _finetune(**{"transfer.strategy": "custom", "transfer.rules": (("head/.*", 1.0), (".*", 0.0)),
                          "model.kwargs.drop_path_rate": 0.1})
    save_resolved(config, tmp_path)
    loaded = load_resolved(tmp_path)
    assert to_dict(loaded) == to_dict(config)
    assert loaded.transfer.rules == (("head/.*", 1.0), (".*", 0.0)) and loaded.data.augment.crop_scale == (0.25, 1.0)
    assert config_from_dict(to_dict(base_config()), "x").to_dict() == base_config().to_dict()


def test_the_configuration_reference_is_current_and_names_every_key_and_its_readers():
    """docs/config.md is what `config_reference` makes from the declarations (regenerate it with
    `python docs/make_config_reference.py`); every key is in it, and every key is read by some strategy."""
    from jaxtl.commands import config_reference
    from jaxtl.config import KEYS

    text = config_reference()
    assert (REPO / "docs" / "config.md").read_text() == text, \
        "docs/config.md is stale: run python docs/make_config_reference.py"
    assert set(KEYS) == set(leaves(base_config()))
    for key in KEYS:
        assert f"| `{key}` |" in text
    assert "(see meaning)" not in text  # no key that no run reads
    cells = {line.split(" | ")[0].strip("| `"): line.split(" | ") for line in text.splitlines()
             if line.startswith("| `")}
    rows = {key: row[5].rstrip(" |") for key, row in cells.items()}
    assert [cells[key][2] for key in ("train.epochs", "optimizer.lr", "model.name", "data.augment.crop_scale",
                                      "train.bf16")] == ["int", "float", "str", "tuple", "bool"]  # the type column
    assert rows["probe.max_iter"] == "linear_probe" and rows["transfer.cached_maps_gb"] == "finetune_top, gradual"
    assert rows["transfer.auto_budget_minutes"] == "auto" and rows["train.epochs"] != "every run"  # probes: no epochs
