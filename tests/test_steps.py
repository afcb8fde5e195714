"""Train and eval steps: frozen parameters untouched and free (whole groups or half a stage), the BatchNorm rule,
data-parallel equivalence."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from jaxtl.core.sharding import global_batch, make_mesh
from jaxtl.models import resnet
from jaxtl.models.classifier import Classifier, init_variables
from jaxtl.train.steps import step_for_rules
from jaxtl.transfer.strategies import make_phases
from tests.conftest import OPT_LEVEL, REPO, suite_xla_options

# A tiny ResNet with two blocks in its last stage, so that half a stage can be frozen.
Backbone = functools.partial(resnet.ResNet, stage_sizes=(1, 1, 1, 2), block_cls=resnet.BasicBlock, width=8)
HALF_STAGE = (("head/.*", 1.0), ("backbone/stage4/block1/.*", 1.0), (".*", 0.0))


def _setup(strategy, batch=8, size=32, train_frozen_bn=False, **kwargs):
    model = Classifier(Backbone(), 3)
    variables = init_variables(model, jax.random.key(0))
    (phase,) = make_phases(strategy, 1, model.backbone.groups, **kwargs)
    step, state = step_for_rules(model, variables, phase.rules, optax.constant_schedule(0.1), make_mesh(),
                                 weight_decay=1e-4, train_frozen_bn=train_frozen_bn)
    rng = np.random.RandomState(0)
    batch = {"images": rng.randn(batch, size, size, 3).astype(np.float32) * 2 + 0.5,
             "labels": rng.randint(0, 3, batch).astype(np.int32), "mask": np.ones(batch, np.float32)}
    return model, step, state, batch


def _changed(before, after):
    return jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), before, after)


def _two_steps(step, state, batch):
    mesh = make_mesh()
    before = jax.device_get(state)
    state, _ = step(state, global_batch(batch, mesh))
    state, sums = step(state, global_batch(batch, mesh))
    assert float(sums["count"]) == len(batch["labels"])
    return before, jax.device_get(state)


def test_linear_probe_leaves_backbone_and_its_statistics_untouched():
    _, step, state, batch = _setup("linear_probe")
    before, after = _two_steps(step, state, batch)
    assert not any(jax.tree_util.tree_leaves(_changed(before.params["backbone"], after.params["backbone"])))
    assert not any(jax.tree_util.tree_leaves(_changed(before.batch_stats, after.batch_stats)))
    assert all(jax.tree_util.tree_leaves(_changed(before.params["head"], after.params["head"])))


def test_half_a_stage_frozen_by_rules():
    _, step, state, batch = _setup("custom", rules=HALF_STAGE)
    before, after = _two_steps(step, state, batch)
    params, stats = _changed(before.params, after.params), _changed(before.batch_stats, after.batch_stats)
    stage4 = params["backbone"]["stage4"]
    assert all(jax.tree_util.tree_leaves(stage4["block1"])) and not any(jax.tree_util.tree_leaves(stage4["block0"]))
    assert not any(jax.tree_util.tree_leaves(params["backbone"]["stage3"]))
    # BatchNorm statistics follow their parameters: kept in the frozen block, updated in the trained one
    assert all(jax.tree_util.tree_leaves(stats["backbone"]["stage4"]["block1"]))
    assert not any(jax.tree_util.tree_leaves(stats["backbone"]["stage4"]["block0"]))


def test_train_frozen_bn_option_updates_statistics():
    _, step, state, batch = _setup("linear_probe", train_frozen_bn=True)  # fastai's choice
    before, after = _two_steps(step, state, batch)
    assert all(jax.tree_util.tree_leaves(_changed(before.batch_stats, after.batch_stats)))
    assert not any(jax.tree_util.tree_leaves(_changed(before.params["backbone"], after.params["backbone"])))


def _flops(strategy, **kwargs):
    model, step, state, batch = _setup(strategy, batch=16, size=64, **kwargs)
    return step.lower(state, global_batch(batch, make_mesh())).compile().cost_analysis()["flops"], model, state, batch


@pytest.mark.slow
def test_backward_pass_stops_at_the_first_trained_parameter():
    probe, model, state, batch = _flops("linear_probe")
    half, *_ = _flops("custom", rules=HALF_STAGE)
    top, *_ = _flops("finetune_top", num_stages=1)
    full, *_ = _flops("finetune_all")
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    forward_flops = forward.lower(variables, batch["images"]).compile().cost_analysis()["flops"]
    assert probe < 1.3 * forward_flops, (probe, forward_flops)
    assert probe < half < top < full, (probe, half, top, full)
    assert full > 2.5 * forward_flops, (full, forward_flops)


_EQUIVALENCE_SCRIPT = """
import json
from tests.test_steps import _setup
from jaxtl.core.sharding import global_batch, make_mesh
_, step, state, batch = _setup("finetune_all", batch=16)
mesh = make_mesh()
losses = []
for i in range(4):
    state, sums = step(state, global_batch(batch, mesh))
    losses.append(float(sums["loss"] / sums["count"]))
print(json.dumps({"devices": mesh.size, "losses": losses}))
"""


def _run_on(devices: int) -> dict:
    # the device count as XLA's flag, and of the suite's options all but its level 0 (XLA's default optimisation):
    # at level 0, with JAX_NUM_CPU_DEVICES, the eight devices' reduction rounded 1.6e-5 apart from one device's at
    # the third step
    flags = [f"--xla_force_host_platform_device_count={devices}",
             *(f"--{name}={value}" for name, value in suite_xla_options().items() if name != OPT_LEVEL)]
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _EQUIVALENCE_SCRIPT], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_eight_devices_give_the_same_losses_as_one():
    one, eight = _run_on(1), _run_on(8)
    assert (one["devices"], eight["devices"]) == (1, 8)
    assert one["losses"][0] != one["losses"][-1]  # it trains
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5, atol=1e-6)


def test_evaluation_sums_on_the_device_and_fetches_once_per_split(monkeypatch):
    """1000 classes, several batches: the sums and the confusion matrix are added up on the devices, and the only
    device-to-host transfer of the split is the final fetch (JAX's transfer guard forbids any implicit one)."""
    import jaxtl
    from jaxtl.train.steps import IMAGES, eval_metrics, make_eval_step

    model = Classifier(resnet.ResNet(stage_sizes=(1, 1, 1, 1), block_cls=resnet.BasicBlock, width=4), 1000)
    variables = init_variables(model, jax.random.key(0))
    state = jaxtl.create_train_state(variables, optax.sgd(0.1))
    mesh = make_mesh()
    rng = np.random.default_rng(0)
    batches = [{"images": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
                "labels": rng.integers(0, 1000, 8).astype(np.int32), "mask": np.ones(8, np.float32)} for _ in range(5)]
    batches[-1]["mask"][5:] = 0.0  # a padded last batch
    eval_step = make_eval_step(model, 1000, mesh, IMAGES)
    fetched = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda tree: (fetched.append(tree), real(tree))[1])
    with jax.transfer_guard_device_to_host("disallow"):
        metrics = jaxtl.evaluate(eval_step, state, iter(batches), mesh)
    assert len(fetched) == 1
    monkeypatch.setattr(jax, "device_get", real)
    per_batch = [real(eval_step(state.params, state.batch_stats, global_batch(b, mesh))) for b in batches]
    reference = eval_metrics({k: sum(s[k] for s in per_batch) for k in per_batch[0]})
    assert metrics["accuracy"] == pytest.approx(reference["accuracy"]) and np.array_equal(
        metrics["confusion"], reference["confusion"]) and np.sum(metrics["confusion"]) == 37
    assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-6)


@pytest.mark.slow
def test_a_state_created_on_the_mesh_is_stepped_with_one_compilation_and_the_variables_stay_usable():
    """`create_train_state(..., mesh=)` places the state as the step returns it: three steps compile once, and a
    state placed otherwise makes the same step compile again (what the mesh argument saves); the step's donation
    leaves the caller's variables intact."""
    import jax.monitoring

    import jaxtl
    from jaxtl.train.steps import make_train_step

    compiles, counting = [], []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(event) if counting and "backend_compile" in event else None)
    model = Classifier(resnet.ResNet(stage_sizes=(1, 1, 1, 1), block_cls=resnet.BasicBlock, width=4), 3)
    variables = init_variables(model, jax.random.key(0))
    before = jax.device_get(variables)
    mesh, tx = make_mesh(), optax.sgd(0.1)
    step = make_train_step(model, tx, mesh)
    rng = np.random.RandomState(0)
    batch = global_batch({"images": rng.randn(8, 32, 32, 3).astype(np.float32),
                          "labels": rng.randint(0, 3, 8).astype(np.int32), "mask": np.ones(8, np.float32)}, mesh)

    def compiled_in_three_steps(state):
        counting.append(True)
        for _ in range(3):
            state, sums = step(state, batch)
        jax.block_until_ready(sums)
        counting.clear()
        count = len(compiles)
        compiles.clear()
        return count

    assert compiled_in_three_steps(jaxtl.create_train_state(variables, tx, mesh=mesh)) == 1
    assert compiled_in_three_steps(jaxtl.create_train_state(variables, tx)) == 1  # placed otherwise: once more
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(variables), before)
