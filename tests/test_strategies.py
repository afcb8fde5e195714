"""Strategies as presets of rules: which parameters of a real backbone each one trains, at what multiplier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl.core.errors import ConfigError
from jaxtl.models.classifier import Classifier
from jaxtl.rules import match_rules, tree_paths
from jaxtl.transfer.strategies import make_phases
from tests.conftest import TinyEfficientNetLite, TinyMobileNetV2, TinyResNet, TinyVGG, TinyViT

GROUPS = TinyResNet().groups


def _params(backbone=TinyResNet):
    model = Classifier(backbone(), 3)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]


def _multipliers(strategy, backbone=TinyResNet, **kwargs):
    (phase,) = make_phases(strategy, 1, backbone().groups, **kwargs)
    values = match_rules(_params(backbone), phase.rules, strategy)
    paths = jax.tree_util.tree_leaves(tree_paths(values))
    return dict(zip(paths, jax.tree_util.tree_leaves(values)))


def _by_group(multipliers):
    groups = {}
    for path, m in multipliers.items():
        parts = path.split("/")
        groups.setdefault(parts[1] if parts[0] == "backbone" else parts[0], set()).add(m)
    return groups


def test_linear_probe_trains_only_the_head():
    groups = _by_group(_multipliers("linear_probe"))
    assert groups.pop("head") == {1.0} and all(v == {0.0} for v in groups.values())


def test_finetune_top_trains_the_last_groups():
    groups = _by_group(_multipliers("finetune_top", num_stages=2))
    assert {g for g, v in groups.items() if v == {1.0}} == {"stage3", "stage4", "head"}
    with pytest.raises(ConfigError, match=r"transfer.num_stages=6: finetune_top trains the last 1..5 groups"):
        make_phases("finetune_top", 1, GROUPS, num_stages=6)


@pytest.mark.parametrize("strategy", ["finetune_all", "scratch"])
def test_everything_trains(strategy):
    assert set(_multipliers(strategy).values()) == {1.0}


def test_discriminative_is_geometric_from_lr_ratio_to_one():
    groups = _by_group(_multipliers("discriminative", lr_ratio=0.01))
    values = np.array([groups[g].pop() for g in (*GROUPS, "head")])
    np.testing.assert_allclose([values[0], values[-1]], [0.01, 1.0])
    ratios = values[1:] / values[:-1]
    np.testing.assert_allclose(ratios, ratios[0])


@pytest.mark.parametrize("backbone", [TinyResNet, TinyEfficientNetLite, TinyMobileNetV2, TinyVGG, TinyViT])
def test_norm_only_trains_every_norm_scale_and_bias_and_the_head(backbone):
    multipliers = _multipliers("norm_only", backbone)
    trained = {p for p, m in multipliers.items() if m}
    norms = {p for p in multipliers if p.startswith("backbone/") and p.rsplit("/", 1)[1] in ("scale", "bias")
             and ("bn" in p.split("/")[-2] or "norm" in p.split("/")[-2])}
    assert norms and trained == norms | {p for p in multipliers if p.startswith("head/")}
    if backbone is TinyViT:  # LayerNorm-only fine-tuning: both norms of every block and the final one
        assert {"backbone/stage1/block0/norm1/scale", "backbone/stage4/norm/bias"} <= trained


@pytest.mark.parametrize("backbone", [TinyResNet, TinyEfficientNetLite, TinyMobileNetV2, TinyVGG, TinyViT])
def test_bitfit_trains_every_bias_and_the_head_and_no_scale_or_kernel(backbone):
    multipliers = _multipliers("bitfit", backbone)
    trained = {p for p, m in multipliers.items() if m}
    biases = {p for p in multipliers if p.startswith("backbone/") and p.endswith("/bias")}
    assert biases and trained == biases | {p for p in multipliers if p.startswith("head/")}
    assert not any(p.endswith(("/scale", "/kernel")) for p in trained if p.startswith("backbone/"))
    if backbone is TinyViT:  # unlike norm_only: attention and MLP biases train, LayerNorm scales do not
        assert {"backbone/stage1/block0/attn/query/bias", "backbone/stage1/block0/fc2/bias",
                "backbone/stage1/block0/norm1/bias"} <= trained
        assert multipliers["backbone/stage1/block0/norm1/scale"] == 0.0


def test_norm_only_on_a_backbone_without_norms_is_an_error():
    with pytest.raises(ConfigError, match=r"norm_only: rule\(s\) \['backbone/\(\.\*/\)\?"):
        _multipliers("norm_only", lambda: TinyVGG(batch_norm=False))


def test_vgg_groups_are_its_stages_and_its_fc_layers():
    groups = _by_group(_multipliers("finetune_top", TinyVGG, num_stages=1))
    assert {g for g, v in groups.items() if v == {1.0}} == {"fc", "head"}


def test_gradual_unfreezes_one_group_per_phase_from_the_top():
    phases = make_phases("gradual", 0, GROUPS, phase_epochs=(1, 2, 3))
    trained = []
    for phase in phases:
        values = match_rules(_params(), phase.rules, "gradual")
        groups = _by_group(dict(zip(jax.tree_util.tree_leaves(tree_paths(values)), jax.tree_util.tree_leaves(values))))
        trained.append({g for g, v in groups.items() if v == {1.0}})
    assert trained == [{"head"}, {"stage4", "head"}, {"stage3", "stage4", "head"}]
    assert [p.epochs for p in phases] == [1, 2, 3]


def test_custom_rules_are_the_config_s_own():
    multipliers = _multipliers("custom", rules=(("head/.*", 1.0), ("backbone/stage4/.*", 0.1), (".*", 0.0)))
    groups = _by_group(multipliers)
    assert groups["head"] == {1.0} and groups["stage4"] == {0.1} and groups["stem"] == {0.0}


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="finetune_everything"), "unknown transfer.strategy 'finetune_everything'"),
    (dict(strategy="discriminative", lr_ratio=0.0), r"transfer.lr_ratio=0.0: must be in \(0, 1\]"),
    (dict(strategy="gradual"), r"transfer.phase_epochs=\(\): gradual needs 1..6"),
    (dict(strategy="gradual", phase_epochs=(1,) * 7), "gradual needs 1..6"),
    (dict(strategy="custom"), "transfer.rules, which is empty"),
])
def test_bad_settings_name_the_key(kwargs, match):
    strategy = kwargs.pop("strategy")
    with pytest.raises(ConfigError, match=match):
        make_phases(strategy, 1, GROUPS, **kwargs)
