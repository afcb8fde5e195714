"""One multi_transform over cohort labels: frozen parameters hold no state, decay only where the rules say,
cohorts that keep training across gradual phases keep their state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl.models.classifier import Classifier, init_variables
from jaxtl.rules import match_rules
from jaxtl.transfer.optimizer import FROZEN, carry_over_state, cohort_labels, make_optimizer
from jaxtl.transfer.strategies import make_phases
from tests.conftest import TinyResNet

GROUPS = TinyResNet().groups
DECAY = ((".*/kernel", True), (".*", False))


def _params():
    return init_variables(Classifier(TinyResNet(), 3), jax.random.key(0))["params"]


def _multipliers(params, strategy, index=0, **kwargs):
    phase = make_phases(strategy, 1, GROUPS, **kwargs)[index]
    return match_rules(params, phase.rules, strategy)


def _optimizer(params, history, name="sgd", **kwargs):
    labels, cohorts = cohort_labels(history)
    return make_optimizer(labels, cohorts, optax.constant_schedule(0.1), name,
                          decay=match_rules(params, DECAY, "decay"), **kwargs)


def _state_leaves(state) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(state) if hasattr(x, "size") and x.ndim > 0)


def test_frozen_parameters_hold_no_optimizer_state():
    params = _params()
    head_size = sum(x.size for x in jax.tree_util.tree_leaves(params["head"]))
    all_size = sum(x.size for x in jax.tree_util.tree_leaves(params))
    probe_state = _optimizer(params, [_multipliers(params, "linear_probe")], "adamw").init(params)
    full_state = _optimizer(params, [_multipliers(params, "finetune_all")], "adamw").init(params)
    assert _state_leaves(probe_state.inner_states[FROZEN]) == 0
    assert _state_leaves(probe_state) == 2 * head_size  # Adam's mu and nu of the head only
    assert _state_leaves(full_state) == 2 * all_size


def test_updates_zero_for_frozen_decay_only_kernels_lr_times_multiplier():
    params = _params()
    rules = (("head/.*", 1.0), ("backbone/stage4/.*", 0.1), (".*", 0.0))
    tx = _optimizer(params, [_multipliers(params, "custom", rules=rules)], weight_decay=0.5, momentum=0.0)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    for group in ("stem", "stage1", "stage2", "stage3"):
        assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(updates["backbone"][group]))
    np.testing.assert_allclose(updates["head"]["fc"]["kernel"], -0.1 * 0.5 * params["head"]["fc"]["kernel"], rtol=1e-6)
    stage4 = params["backbone"]["stage4"]["block0"]["conv1"]["kernel"]
    np.testing.assert_allclose(updates["backbone"]["stage4"]["block0"]["conv1"]["kernel"], -0.1 * 0.1 * 0.5 * stage4,
                               rtol=1e-5)
    assert float(jnp.abs(updates["head"]["fc"]["bias"]).max()) == 0.0  # biases are not decayed
    assert float(jnp.abs(updates["backbone"]["stage4"]["block0"]["bn1"]["scale"]).max()) == 0.0  # nor norm scales


def test_cohorts_are_multiplier_and_first_phase():
    params = _params()
    first, second = (_multipliers(params, "gradual", i, phase_epochs=(1, 1)) for i in range(2))
    labels, cohorts = cohort_labels([first, second])
    assert labels["head"]["fc"]["kernel"] == "x1@0" and labels["backbone"]["stage4"]["block0"]["conv1"]["kernel"] == "x1@1"
    assert labels["backbone"]["stem"]["conv"]["kernel"] == FROZEN
    assert set(cohorts) == {"x1@0", "x1@1"} and cohorts["x1@1"].since == 1


def test_gradual_carries_state_of_cohorts_that_stay_trainable():
    params = _params()
    first, second = (_multipliers(params, "gradual", i, phase_epochs=(1, 1)) for i in range(2))
    tx1 = _optimizer(params, [first], "adamw")
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    _, state1 = tx1.update(grads, tx1.init(params), params)
    tx2 = _optimizer(params, [first, second], "adamw", steps_done={"x1@0": 1})
    state2 = carry_over_state(state1, tx2.init(params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, state2.inner_states["x1@0"], state1.inner_states["x1@0"])
    assert _state_leaves(state2.inner_states["x1@1"]) > 0


def test_schedule_restarts_per_phase_for_carried_cohorts():
    params = _params()
    first, second = (_multipliers(params, "gradual", i, phase_epochs=(1, 1)) for i in range(2))
    seen = []
    schedule = lambda step: (seen.append(step), 0.1)[1]  # noqa: E731
    labels, cohorts = cohort_labels([first, second])
    tx = make_optimizer(labels, cohorts, schedule, "sgd", momentum=0.0, steps_done={"x1@0": 7})
    state = tx.init(params)
    tx.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
    assert any(int(s) == -7 for s in seen if not isinstance(s, jax.core.Tracer))
