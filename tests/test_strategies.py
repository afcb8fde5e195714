"""Strategies as per-group LR multipliers."""

import numpy as np
import pytest

from jaxtl.transfer.strategies import GROUPS, make_phases


def test_linear_probe_trains_only_the_head():
    (phase,) = make_phases("linear_probe", 3)
    assert phase.trainable == ("head",) and phase.epochs == 3
    assert phase.frozen == ("stem", "stage1", "stage2", "stage3", "stage4")


def test_finetune_top_trains_last_stages():
    (phase,) = make_phases("finetune_top", 2, num_stages=2)
    assert phase.trainable == ("stage3", "stage4", "head")


@pytest.mark.parametrize("strategy", ["finetune_all", "scratch"])
def test_everything_trains(strategy):
    (phase,) = make_phases(strategy, 1)
    assert phase.trainable == GROUPS and all(m == 1.0 for m in phase.lr_multipliers.values())


def test_discriminative_is_geometric_from_lr_ratio_to_one():
    (phase,) = make_phases("discriminative", 1, lr_ratio=0.01)
    values = np.array([phase.lr_multipliers[g] for g in GROUPS])
    np.testing.assert_allclose([values[0], values[-1]], [0.01, 1.0])
    ratios = values[1:] / values[:-1]
    np.testing.assert_allclose(ratios, ratios[0])


def test_gradual_unfreezes_one_stage_per_phase_from_the_top():
    phases = make_phases("gradual", 0, phase_epochs=(1, 2, 3))
    assert [p.trainable for p in phases] == [("head",), ("stage4", "head"), ("stage3", "stage4", "head")]
    assert [p.epochs for p in phases] == [1, 2, 3]


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="finetune_everything"), "unknown transfer.strategy"),
    (dict(strategy="finetune_top", num_stages=5), "num_stages"),
    (dict(strategy="discriminative", lr_ratio=0.0), "lr_ratio"),
    (dict(strategy="gradual"), "phase_epochs"),
])
def test_bad_settings_name_the_key(kwargs, match):
    strategy = kwargs.pop("strategy")
    with pytest.raises(ValueError, match=match):
        make_phases(strategy, 1, **kwargs)
