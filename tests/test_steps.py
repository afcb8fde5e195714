"""Train and eval steps: frozen groups untouched and free, BatchNorm rule, data-parallel equivalence."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl.models.common import init_variables
from jaxtl.models.registry import TinyResNet
from jaxtl.sharding import global_batch, make_mesh
from jaxtl.train.steps import TrainState, make_train_step
from jaxtl.transfer.optimizer import make_optimizer
from jaxtl.transfer.strategies import make_phases
from tests.conftest import REPO


def _setup(strategy, batch=8, size=32, **kwargs):
    model = TinyResNet(num_classes=3)
    variables = init_variables(model, jax.random.key(0))
    (phase,) = make_phases(strategy, 1, **kwargs)
    tx = make_optimizer(variables["params"], phase, optax.constant_schedule(0.1), "sgd", 1e-4)
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"],
                       tx.init(variables["params"]), jax.random.key_data(jax.random.key(0)))
    rng = np.random.RandomState(0)
    batch = {"images": rng.randn(batch, size, size, 3).astype(np.float32) * 2 + 0.5,
             "labels": rng.randint(0, 3, batch).astype(np.int32), "mask": np.ones(batch, np.float32)}
    return model, tx, phase, state, batch


def test_linear_probe_leaves_backbone_and_its_statistics_untouched():
    model, tx, phase, state, batch = _setup("linear_probe")
    mesh = make_mesh()
    before = jax.device_get(state)
    step = make_train_step(model, tx, phase.frozen, phase.frozen, 0.0, mesh)
    state, _ = step(state, global_batch(batch, mesh))
    state, sums = step(state, global_batch(batch, mesh))
    after = jax.device_get(state)
    for group in phase.frozen:
        jax.tree_util.tree_map(np.testing.assert_array_equal, after.params[group], before.params[group])
        jax.tree_util.tree_map(np.testing.assert_array_equal, after.batch_stats[group], before.batch_stats[group])
    assert not np.allclose(after.params["head"]["fc"]["kernel"], before.params["head"]["fc"]["kernel"])
    assert float(sums["count"]) == 8


def test_train_frozen_bn_option_updates_statistics():
    model, tx, phase, state, batch = _setup("linear_probe")
    mesh = make_mesh()
    before = jax.device_get(state.batch_stats)
    step = make_train_step(model, tx, phase.frozen, (), 0.0, mesh)  # fastai's choice: BN trains everywhere
    state, _ = step(state, global_batch(batch, mesh))
    assert not np.allclose(state.batch_stats["stem"]["bn"]["mean"], before["stem"]["bn"]["mean"])


def _flops(strategy):
    model, tx, phase, state, batch = _setup(strategy, batch=16, size=64)
    mesh = make_mesh()
    step = make_train_step(model, tx, phase.frozen, phase.frozen, 0.0, mesh)
    return step.lower(state, global_batch(batch, mesh)).compile().cost_analysis()["flops"], model, state, batch


def test_backward_pass_stops_at_the_head_when_all_else_is_frozen():
    probe_flops, model, state, batch = _flops("linear_probe")
    full_flops, *_ = _flops("finetune_all")
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    forward_flops = forward.lower(variables, batch["images"]).compile().cost_analysis()["flops"]
    assert probe_flops < 1.3 * forward_flops, (probe_flops, forward_flops)
    assert full_flops > 2.5 * forward_flops, (full_flops, forward_flops)


_EQUIVALENCE_SCRIPT = """
import json, jax, numpy as np
from tests.test_steps import _setup
from jaxtl.sharding import global_batch, make_mesh
from jaxtl.train.steps import make_train_step
model, tx, phase, state, batch = _setup("finetune_all", batch=16)
mesh = make_mesh()
step = make_train_step(model, tx, phase.frozen, (), 0.1, mesh)
losses = []
for i in range(4):
    state, sums = step(state, global_batch(batch, mesh))
    losses.append(float(sums["loss"] / sums["count"]))
print(json.dumps({"devices": mesh.size, "losses": losses}))
"""


def _run_on(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _EQUIVALENCE_SCRIPT], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_eight_devices_give_the_same_losses_as_one():
    one, eight = _run_on(1), _run_on(8)
    assert (one["devices"], eight["devices"]) == (1, 8)
    assert one["losses"][0] != one["losses"][-1]  # it trains
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5, atol=1e-6)
