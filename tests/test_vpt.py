"""Visual prompt tuning (`transfer.strategy=vpt`, `jaxtl.models.vit`): no prompts is the pretrained ViT exactly,
the prompts' shapes and places, only prompts and head train, non-ViTs are refused, and a run resumes exactly."""

from __future__ import annotations


import jax
import numpy as np
import optax
import pytest

from jaxtl.config import apply_overrides, base_config
from jaxtl.core.errors import ConfigError
from jaxtl.core.sharding import global_batch, make_mesh
from jaxtl.models.vit import prompt_params
from jaxtl.rules import tree_paths
from jaxtl.train import plan as plans
from jaxtl.train.restore import evaluate_checkpoint
from jaxtl.train.run import train_and_evaluate
from jaxtl.train.steps import step_for_rules
from jaxtl.transfer.strategies import make_phases
from tests.conftest import TinyViT, make_image_folder, tiny_config
from tests.helpers import assert_same_run, killed_and_resumed

VIT = {"model.name": "vit_ti16", "model.kwargs": {}}  # random init at 32x32: a 2x2 patch grid


def _paths(params):
    return dict(zip(jax.tree_util.tree_leaves(tree_paths(params)), jax.tree_util.tree_leaves(params)))


def _with_prompts(backbone, params, seed=2):
    params = jax.tree_util.tree_map(lambda x: x, params)
    for name, prompts in prompt_params(backbone, jax.random.key(seed)).items():
        params[name].update(prompts)
    return params


@pytest.mark.slow
def test_no_prompts_is_the_pretrained_vit_exactly_and_prompts_change_it():
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    plain = TinyViT()
    variables = plain.init(jax.random.key(1), images)
    reference = plain.apply(variables, images)
    unprompted = TinyViT(prompts=0, deep_prompts=True).apply(variables, images)
    for name in reference:
        np.testing.assert_array_equal(unprompted[name], reference[name])
    for pool in ("token", "gap"):
        prompted = TinyViT(prompts=4, pool=pool)
        out = prompted.apply({"params": _with_prompts(prompted, variables["params"])}, images)
        np.testing.assert_array_equal(out["stem"], reference["stem"])  # before the prompts join
        assert out["stage2"].shape == reference["stage2"].shape  # maps leave the prompts out
        assert np.abs(out["pre_logits"] - TinyViT(pool=pool).apply(variables, images)["pre_logits"]).max() > 1e-3


@pytest.mark.parametrize("deep,expected", [(False, {"stage1/prompt0"}),
                                           (True, {"stage1/prompt0", "stage2/prompt1", "stage3/prompt2",
                                                   "stage4/prompt3"})])
def test_prompt_shapes_and_places(deep, expected):
    backbone = TinyViT(prompts=5, deep_prompts=deep)
    initialised = backbone.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    prompts = {p: v.shape for p, v in _paths(initialised).items() if "/prompt" in p}
    assert prompts == {p: (1, 5, 16) for p in expected}
    fresh = _paths(prompt_params(backbone, jax.random.key(3)))
    assert {p: v.shape for p, v in fresh.items()} == prompts
    bound = (6.0 / (3 * 8 ** 2 + 16)) ** 0.5
    assert all(np.abs(v).max() <= bound and np.abs(v).max() > bound / 2 for v in fresh.values())


@pytest.mark.slow
def test_only_the_prompts_and_the_head_train():
    from jaxtl.models.classifier import Classifier, init_variables

    model = Classifier(TinyViT(prompts=3, deep_prompts=True), 3)
    variables = init_variables(model, jax.random.key(0))
    (phase,) = make_phases("vpt", 1, model.backbone.groups)
    mesh = make_mesh()
    step, state = step_for_rules(model, variables, phase.rules, optax.constant_schedule(0.1), mesh)
    rng = np.random.RandomState(0)
    batch = {"images": rng.randn(8, 32, 32, 3).astype(np.float32), "labels": rng.randint(0, 3, 8).astype(np.int32),
             "mask": np.ones(8, np.float32)}
    before = _paths(jax.device_get(state.params))
    for _ in range(2):
        state, _ = step(state, global_batch(batch, mesh))
    after = _paths(jax.device_get(state.params))
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    prompts = {p for p in before if "/prompt" in p}
    assert len(prompts) == 4 and prompts <= changed
    assert changed == prompts | {p for p in before if p.startswith("head/")}
    opt_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state.opt_state))
    assert opt_bytes <= 4 * sum(before[p].size for p in changed) + 64


def test_vpt_on_a_cnn_is_an_error_naming_the_model(tmp_path):
    config = apply_overrides(base_config(), ["model.name='resnet18'", "transfer.strategy='vpt'"])
    with pytest.raises(ConfigError, match="model.name='resnet18' is a resnet model: choose a ViT"):
        plans.model_plan(config, resolve=False)
    config = apply_overrides(tiny_config(tmp_path), ["transfer.vpt_prompts=-1"])
    from jaxtl.config import check_values
    with pytest.raises(ConfigError, match="transfer.vpt_prompts"):
        check_values(config)


VPT_RUN = {**VIT, "train.epochs": 4, "train.checkpoint_every_steps": 4, "data.val_fraction": 0.25,
           "transfer.strategy": "vpt", "transfer.vpt_prompts": 2, "transfer.vpt_deep": True, "optimizer.lr": 0.05}


@pytest.mark.slow
def test_a_vpt_run_resumes_exactly(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=12)
    straight_dir = tmp_path / "straight"
    reference = train_and_evaluate(tiny_config(data, **VPT_RUN), straight_dir)
    head = 192 * 3 + 3
    assert reference["trainable_params"] == 12 * 2 * 192 + head  # twelve blocks' prompts and the head
    workdir, _ = killed_and_resumed(tmp_path, data, VPT_RUN)
    assert_same_run(workdir, reference, straight_dir)
    assert evaluate_checkpoint(workdir)["val"]["accuracy"] == reference["best_val_accuracy"]
