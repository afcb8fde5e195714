"""One multi_transform over group labels: frozen groups hold no state, decay only on trainable kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl.models.common import init_variables
from jaxtl.models.registry import TinyResNet
from jaxtl.transfer.optimizer import FROZEN, carry_over_state, group_labels, make_optimizer
from jaxtl.transfer.strategies import make_phases


def _params():
    return init_variables(TinyResNet(num_classes=3), jax.random.key(0))["params"]


def _state_leaves(state) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(state) if hasattr(x, "size") and x.ndim > 0)


def test_frozen_groups_hold_no_optimizer_state():
    params = _params()
    constant = optax.constant_schedule(0.1)
    (probe,) = make_phases("linear_probe", 1)
    (full,) = make_phases("finetune_all", 1)
    head_size = sum(x.size for x in jax.tree_util.tree_leaves(params["head"]))
    all_size = sum(x.size for x in jax.tree_util.tree_leaves(params))
    probe_state = make_optimizer(params, probe, constant, "adamw").init(params)
    full_state = make_optimizer(params, full, constant, "adamw").init(params)
    assert _state_leaves(probe_state.inner_states[FROZEN]) == 0
    assert _state_leaves(probe_state) == 2 * head_size  # Adam's mu and nu of the head only
    assert _state_leaves(full_state) == 2 * all_size


def test_updates_zero_for_frozen_decay_only_trainable_kernels():
    params = _params()
    (phase,) = make_phases("finetune_top", 1, num_stages=1)
    tx = make_optimizer(params, phase, optax.constant_schedule(0.1), "sgd", weight_decay=0.5, momentum=0.0)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    for group in ("stem", "stage1", "stage2", "stage3"):
        assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(updates[group]))
    np.testing.assert_allclose(updates["head"]["fc"]["kernel"], -0.1 * 0.5 * params["head"]["fc"]["kernel"], rtol=1e-6)
    assert float(jnp.abs(updates["head"]["fc"]["bias"]).max()) == 0.0  # biases are not decayed
    assert float(jnp.abs(updates["stage4"]["block0"]["bn1"]["scale"]).max()) == 0.0  # nor norm scales


def test_labels_are_group_names():
    params = _params()
    (phase,) = make_phases("finetune_top", 1, num_stages=1)
    labels = group_labels(params, phase)
    assert set(jax.tree_util.tree_leaves(labels["stage4"])) == {"stage4"}
    assert set(jax.tree_util.tree_leaves(labels["stem"])) == {FROZEN}


def test_gradual_carries_state_of_groups_that_stay_trainable():
    params = _params()
    first, second = make_phases("gradual", 0, phase_epochs=(1, 1))
    constant = optax.constant_schedule(0.1)
    tx1 = make_optimizer(params, first, constant, "adamw")
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    _, state1 = tx1.update(grads, tx1.init(params), params)
    tx2 = make_optimizer(params, second, constant, "adamw", steps_done={"head": 1})
    state2 = carry_over_state(state1, tx2.init(params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, state2.inner_states["head"], state1.inner_states["head"])
    assert _state_leaves(state2.inner_states["stage4"]) > 0


def test_schedule_restarts_per_phase_for_carried_groups():
    params = _params()
    (_, second) = make_phases("gradual", 0, phase_epochs=(1, 1))
    seen = []
    schedule = lambda step: (seen.append(step), 0.1)[1]  # noqa: E731
    tx = make_optimizer(params, second, schedule, "sgd", momentum=0.0, steps_done={"head": 7})
    state = tx.init(params)
    tx.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
    assert any(int(s) == -7 for s in seen if not isinstance(s, jax.core.Tracer))
