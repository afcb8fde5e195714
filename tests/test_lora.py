"""LoRA (`jaxtl.models.lora`, `transfer.strategy=lora`): the pretrained outputs exactly at step 0, merged kernels
equal to the low-rank branch, nothing spent on frozen kernels, errors for what cannot be adapted, and a run that
resumes exactly and keeps a plain model."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl.core.errors import ConfigError
from jaxtl.core.sharding import global_batch, make_mesh
from jaxtl.models.classifier import Classifier, init_variables
from jaxtl.models.lora import LORA_A, LORA_B, add_lora, default_targets, has_lora, merge_lora
from jaxtl.rules import path_of, tree_paths
from jaxtl.train.checkpoints import Checkpoints
from jaxtl.train.restore import evaluate_checkpoint, load_trained
from jaxtl.train.run import train_and_evaluate
from jaxtl.train.steps import step_for_rules
from jaxtl.transfer.strategies import make_phases
from jaxtl.weights.create import create_model
from tests.conftest import TinyMobileNetV2, TinyResNet, TinyViT, make_image_folder, tiny_config
from tests.helpers import assert_same_run, cli, config_file, killed_and_resumed, one_line_error

SCALE = 2.0


def _perturbed(params: dict, seed: int = 0) -> dict:
    """Factors as training leaves them: both non-zero."""
    def shake(key_path, leaf):
        name = str(getattr(key_path[-1], "key", ""))
        if name in (LORA_A, LORA_B):
            noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), hash(str(key_path)) % 2**31),
                                      leaf.shape)
            return leaf + 0.05 * noise
        return leaf
    return jax.tree_util.tree_map_with_path(shake, params)


def _paths(params: dict) -> dict:
    return dict(zip(jax.tree_util.tree_leaves(tree_paths(params)), jax.tree_util.tree_leaves(params)))


@pytest.mark.slow
def test_fresh_factors_give_the_pretrained_logits_exactly_and_merge_to_the_branch():
    model, variables = create_model("efficientnet_lite0", "default")  # real weights, the 1000-class head
    images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3), minval=-2.0, maxval=2.0)
    reference = jax.jit(model.apply)(variables, images)[0]
    targets = default_targets(variables["params"])
    assert targets and all(t.endswith(("expand_conv/kernel", "project_conv/kernel", "head_conv/kernel"))
                           for t in targets)
    params = add_lora(variables["params"], targets, 8, jax.random.key(2))
    adapted = jax.jit(model.clone(lora_scale=SCALE).apply)
    np.testing.assert_array_equal(adapted(dict(variables, params=params), images)[0], reference)
    trained = _perturbed(params)
    unmerged = adapted(dict(variables, params=trained), images)[0]
    merged = jax.jit(model.apply)(dict(variables, params=merge_lora(trained, SCALE)), images)[0]
    assert np.abs(unmerged - reference).max() > 1e-2  # the factors change the model...
    np.testing.assert_allclose(merged, unmerged, atol=1e-5 * float(np.abs(unmerged).max()))  # ...as merged kernels


@pytest.mark.parametrize("backbone,targets,feature", [
    (TinyResNet, (r"backbone/.*/conv\d/kernel",), "stage3"),  # 3x3 convolutions, the kernel as a matrix
    (TinyMobileNetV2, (), "stage3"),  # 1x1 convolutions (strided included)
    (TinyViT, (), "pre_logits"),  # attention projections and MLP
])
@pytest.mark.slow
def test_merged_kernels_equal_the_low_rank_branch(backbone, targets, feature):
    model = Classifier(backbone(), 3)
    variables = init_variables(model, jax.random.key(0))
    params = _perturbed(add_lora(variables["params"], targets or default_targets(variables["params"]), 3,
                                 jax.random.key(1)))
    images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    apply = jax.jit(model.apply)
    unmerged = jax.jit(model.clone(lora_scale=SCALE).apply)(dict(variables, params=params), images)[1][feature]
    merged = apply(dict(variables, params=merge_lora(params, SCALE)), images)[1][feature]
    plain = apply(variables, images)[1][feature]
    scale = float(np.abs(plain).max())  # random-init tiny models' maps are small: compare relative to them
    assert np.abs(unmerged - plain).max() > 0.05 * scale
    np.testing.assert_allclose(merged, unmerged, atol=1e-5 * scale)
    if backbone is TinyViT:
        assert {"attn/query", "attn/out", "fc1", "fc2"} <= {"/".join(p.split("/")[-3:-1]).removeprefix(
            "block0/") for p in _paths(params) if p.endswith(LORA_A)}


def _weight_gradient_dots(hlo: str, shapes: set[tuple[int, ...]]) -> int:
    """How many matrix products in a compiled step produce a tensor of one of the kernels' shapes (their weight
    gradients: nothing else in a ViT step is (in, out)-shaped)."""
    found = re.findall(r"= f32\[(\d+),(\d+)\]\{[^}]*\} dot\(", hlo)
    return sum((int(a), int(b)) in shapes for a, b in found)


@pytest.mark.slow
def test_frozen_kernels_get_no_gradient_and_no_optimizer_state():
    model = Classifier(TinyViT(), 3)  # no BatchNorm: the step is the layers' own
    variables = init_variables(model, jax.random.key(0))
    targets = default_targets(variables["params"])
    lora_params = add_lora(variables["params"], targets, 1, jax.random.key(1))
    kernel_shapes = {tuple(leaf.shape) for path, leaf in _paths(variables["params"]).items()
                     if any(re.fullmatch(t, path) for t in targets)}
    rng = np.random.RandomState(0)
    batch = {"images": rng.randn(6, 32, 32, 3).astype(np.float32), "labels": rng.randint(0, 3, 6).astype(np.int32),
             "mask": np.ones(6, np.float32)}  # 6 images: no activation has a kernel's shape
    mesh = make_mesh()
    flops, dots, states = {}, {}, {}
    adapted = model.clone(lora_scale=SCALE)
    for name, rules in (("lora", make_phases("lora", 1, model.backbone.groups)[0].rules),
                        ("lora_and_kernels", ((".*", 1.0),))):
        step, state = step_for_rules(adapted, dict(variables, params=lora_params), rules,
                                     optax.constant_schedule(0.1), mesh)
        compiled = step.lower(state, global_batch(batch, mesh)).compile()
        flops[name], dots[name] = compiled.cost_analysis()["flops"], _weight_gradient_dots(compiled.as_text(),
                                                                                          kernel_shapes)
        states[name] = (step, state)
    assert dots["lora"] == 0 and dots["lora_and_kernels"] >= len(targets), dots  # no weight gradient computed
    assert flops["lora"] < 0.9 * flops["lora_and_kernels"], flops
    step, state = states["lora"]
    trained = {p: n.size for p, n in _paths(lora_params).items() if p.startswith("head/") or "/lora_" in p}
    opt_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state.opt_state))
    assert 4 * sum(trained.values()) <= opt_bytes <= 4 * sum(trained.values()) + 64  # momentum for those only
    before = _paths(jax.device_get(state.params))
    for _ in range(2):
        state, _ = step(state, global_batch(batch, mesh))
    after = _paths(jax.device_get(state.params))
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed <= set(trained)
    assert any(p.endswith(LORA_B) for p in changed) and any(p.endswith(LORA_A) for p in changed)
    assert any(p.startswith("head/") for p in changed)


@pytest.mark.slow
@pytest.mark.slow
def test_what_lora_cannot_adapt_is_an_error_naming_it():
    model = Classifier(TinyMobileNetV2(), 3)
    variables = init_variables(model, jax.random.key(0))
    with pytest.raises(ConfigError, match="no backbone kernel matches"):
        add_lora(variables["params"], ("backbone/nothing/.*",), 4, jax.random.key(1))
    depthwise = [p for p in _paths(variables["params"]) if "dw_conv" in p and p.endswith("/kernel")][0]
    params = add_lora(variables["params"], (depthwise,), 4, jax.random.key(1))
    with pytest.raises(ConfigError, match=f"{depthwise.removesuffix('/kernel')}/kernel, a DepthwiseConv"):
        model.clone(lora_scale=SCALE).apply(dict(variables, params=params), jnp.zeros((1, 32, 32, 3)))
    limit, narrowest = min((min(int(np.prod(leaf.shape[:-1])), leaf.shape[-1]), path_of(path)) for path, leaf in
                           jax.tree_util.tree_leaves_with_path(variables["params"])
                           if re.fullmatch(r"backbone/stage4/.*/kernel", path_of(path)))
    assert add_lora(variables["params"], (re.escape(narrowest),), limit, jax.random.key(1))  # full rank: allowed
    with pytest.raises(ConfigError, match=f"lora_rank={limit + 1}: above the smaller dimension \\({limit}\\) of "
                                          f"{re.escape(narrowest)}, a kernel it adapts"):
        add_lora(variables["params"], (r"backbone/stage4/.*/kernel",), limit + 1, jax.random.key(1))  # refused first


def test_a_lora_rank_beyond_the_kernels_is_one_line_before_any_work(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    config = config_file(tmp_path, data, LORA_RUN | {"transfer.lora_rank": 100000})
    one_line_error(cli("train", "--config", config, "--workdir", tmp_path / "run"), "transfer.lora_rank=100000",
                   "above the smaller dimension")
    assert not (tmp_path / "run" / "checkpoints").exists()


LORA_RUN = {"train.epochs": 4, "train.checkpoint_every_steps": 4, "data.val_fraction": 0.25, "optimizer.lr": 0.01,
            "transfer.strategy": "lora", "transfer.lora_rank": 2, "transfer.lora_alpha": 4.0,
            "transfer.lora_targets": (r"backbone/stage[34]/.*/kernel",)}


@pytest.mark.slow
def test_a_lora_run_resumes_exactly_and_keeps_a_plain_model(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=12)
    straight_dir = tmp_path / "straight"
    reference = train_and_evaluate(tiny_config(data, **LORA_RUN), straight_dir)
    trainable = reference["trainable_params"]
    assert 0 < trainable < 20000 and reference["optimizer_state_bytes"] < 4 * trainable + 64
    workdir, _ = killed_and_resumed(tmp_path, data, LORA_RUN)
    assert_same_run(workdir, reference, straight_dir)
    # On disk: the best checkpoint is the plain model (kernels merged, no optimizer state); the latest keeps the
    # factors and the optimizer state a resume needs.
    checkpoints = Checkpoints(workdir, read_only=True)
    (best, _), (latest, _) = checkpoints.restore(checkpoints.best), checkpoints.restore(checkpoints.latest)
    checkpoints.close()
    assert not has_lora(best["params"]) and not jax.tree_util.tree_leaves(best.get("opt_state"))
    assert has_lora(latest["params"]) and jax.tree_util.tree_leaves(latest["opt_state"])
    model, variables, _, _ = load_trained(workdir)  # prediction's model: kernels merged, no factors
    assert not has_lora(variables["params"]) and model.lora_scale == 0.0
    assert evaluate_checkpoint(workdir)["val"]["accuracy"] == reference["best_val_accuracy"]
