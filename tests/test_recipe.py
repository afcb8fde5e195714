"""The fine-tuning recipe: Mixup and CutMix, the EMA of the weights, gradient accumulation, class weights,
test-time augmentation, early stopping, the large-batch optimisers, and a run with every key on resuming exactly."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl.config import base_config, check_values
from jaxtl.core.errors import ConfigError
from jaxtl.core.sharding import global_batch, make_mesh
from jaxtl.train.run import train_and_evaluate
from jaxtl.train.steps import IMAGES, create_train_state, loss_and_metrics, make_eval_step, make_train_step
from jaxtl.transfer.optimizer import optimizer_from_rules
from jaxtl.transfer.recipe import Mixing, balanced_class_weights, mix_batch, soft_targets
from tests.conftest import make_image_folder, tiny_config
from tests.helpers import config_file, killed_and_resumed


class ConvNet(nn.Module):
    """No BatchNorm: a batch's gradient is the sum of its micro-batches' exactly."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Dense(self.num_classes)(x.mean((1, 2))), {}


def _batch(size=16, side=16, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    return {"images": rng.normal(size=(size, side, side, 3)).astype(np.float32),
            "labels": rng.integers(0, classes, size).astype(np.int32), "mask": np.ones(size, np.float32)}


def _setup(optimizer="sgd", **step_kwargs):
    model = ConvNet()
    batch = _batch()
    variables = model.init(jax.random.key(0), jnp.asarray(batch["images"][:1]))
    tx = optimizer_from_rules(variables["params"], ((".*", 1.0),), optax.constant_schedule(0.1), optimizer,
                              weight_decay=1e-4)
    mesh = make_mesh()
    step = make_train_step(model, tx, mesh, **step_kwargs)
    state = create_train_state(variables, tx, ema=step_kwargs.get("ema_decay", 0) > 0)
    return model, step, state, global_batch(batch, mesh), mesh


@pytest.mark.slow
def test_mixup_mixes_images_and_labels_with_one_lambda_per_batch():
    batch = _batch(8)
    x, targets = jnp.asarray(batch["images"]), soft_targets(jnp.asarray(batch["labels"]), 3, 0.1)
    mixed, mixed_targets, lam = mix_batch(jax.random.key(3), x, targets, Mixing(mixup=0.8))
    lam = float(lam)
    assert 0.0 < lam < 1.0
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], atol=1e-6)
    np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[::-1], atol=1e-6)
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, atol=1e-6)
    lams = {round(float(mix_batch(jax.random.key(s), x, targets, Mixing(mixup=0.8))[2]), 6) for s in range(5)}
    assert len(lams) == 5  # a new lambda per batch (per key)


def test_cutmix_box_area_matches_its_lambda():
    x = jnp.broadcast_to(jnp.arange(8, dtype=jnp.float32)[:, None, None, None] + 1, (8, 32, 24, 3))
    targets = jax.nn.one_hot(jnp.arange(8) % 3, 3)
    for seed in range(6):
        mixed, mixed_targets, lam = mix_batch(jax.random.key(seed), x, targets, Mixing(cutmix=1.0))
        from_other = np.asarray(mixed[0, :, :, 0] == x[7, 0, 0, 0]).mean()  # example 0 takes example 7's pixels
        assert float(lam) == pytest.approx(1.0 - from_other, abs=1e-6)
        np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[::-1], atol=1e-6)
        assert set(np.unique(np.asarray(mixed[0]))) <= {1.0, 8.0}  # pasted, never blended


def test_both_on_switches_between_mixup_and_cutmix_per_batch():
    x = _batch(4)["images"]
    targets = jax.nn.one_hot(jnp.arange(4) % 3, 3)
    kinds = set()
    for seed in range(12):
        mixed, _, lam = mix_batch(jax.random.key(seed), jnp.asarray(x), targets, Mixing(0.8, 1.0, 0.5))
        blended = np.allclose(mixed, lam * x + (1 - lam) * x[::-1], atol=1e-5)
        kinds.add("mixup" if blended else "cutmix")
    assert kinds == {"mixup", "cutmix"}


@pytest.mark.slow
def test_mixup_in_the_step_trains_on_mixed_targets():
    """The step's loss is the cross-entropy against the mixed targets of its own lambda, not the labels."""
    _, step, state, batch, _ = _setup(mixing=Mixing(mixup=0.8), num_classes=3)
    _, plain, state2, _, _ = _setup()
    _, sums = step(state, batch)
    _, plain_sums = plain(state2, batch)
    assert float(sums["loss"]) != pytest.approx(float(plain_sums["loss"]), rel=1e-3)
    assert float(sums["count"]) == 16
    with pytest.raises(ValueError, match="num_classes"):
        _setup(mixing=Mixing(mixup=0.8))


def test_ema_equals_its_closed_form_over_a_few_steps():
    decay = 0.8
    _, step, state, batch, _ = _setup(ema_decay=decay, ema_warmup=False)
    start = jax.device_get(state.params)
    raw = [start]
    for _ in range(3):
        state, _ = step(state, batch)
        raw.append(jax.device_get(state.params))
    expected = jax.tree_util.tree_map(
        lambda p0, p1, p2, p3: decay**3 * p0 + (1 - decay) * (decay**2 * p1 + decay * p2 + p3), *raw)
    for a, b in zip(jax.tree_util.tree_leaves(state.ema), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert state.kept.params is state.ema


def test_ema_warmup_follows_timm():
    _, step, state, batch, _ = _setup(ema_decay=0.999, ema_warmup=True)
    start = jax.device_get(state.params)
    state, _ = step(state, batch)
    d = min(0.999, 1 / 10)  # step 0: (1 + 0) / (10 + 0)
    expected = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, start, jax.device_get(state.params))
    for a, b in zip(jax.tree_util.tree_leaves(state.ema), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_an_accumulated_step_equals_the_big_batch_step_and_takes_less_memory():
    _, big, state_big, batch, _ = _setup()
    _, accumulated, state_acc, _, _ = _setup(accumulate_steps=4)
    memory = {name: fn.lower(s, batch).compile().memory_analysis().temp_size_in_bytes
              for name, fn, s in (("big", big, state_big), ("accumulated", accumulated, state_acc))}
    state_big, sums_big = big(state_big, batch)
    state_acc, sums_acc = accumulated(state_acc, batch)
    for a, b in zip(jax.tree_util.tree_leaves(state_acc.params), jax.tree_util.tree_leaves(state_big.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for key in ("loss", "correct", "count"):
        assert float(sums_acc[key]) == pytest.approx(float(sums_big[key]), rel=1e-5)
    assert memory["accumulated"] < 0.6 * memory["big"], memory


def test_balanced_class_weights_match_the_formula_and_weight_the_loss():
    labels = np.array([0, 0, 0, 1, 2, 2])
    weights = balanced_class_weights(labels, 3)
    np.testing.assert_allclose(weights, [6 / (3 * 3), 6 / (3 * 1), 6 / (3 * 2)], rtol=1e-6)
    np.testing.assert_allclose(balanced_class_weights(np.array([0, 1, 0, 1]), 2), [1.0, 1.0])
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
    per_example = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 3))
    sums = loss_and_metrics(logits, jnp.asarray(labels), jnp.ones(6), weights=jnp.asarray(weights)[labels])
    assert float(sums["loss"]) == pytest.approx(float(jnp.sum(per_example * weights[labels])), rel=1e-6)


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    model, _, state, batch, mesh = _setup()
    plain = make_eval_step(model, 3, mesh, IMAGES)
    tta = make_eval_step(model, 3, mesh, IMAGES, tta="flip")
    variables = {"params": state.params}
    x = jnp.asarray(_batch()["images"])
    logits = (model.apply(variables, x)[0] + model.apply(variables, x[:, :, ::-1])[0]) / 2
    expected = loss_and_metrics(logits, jnp.asarray(_batch()["labels"]), jnp.ones(16))
    got = tta(state.params, state.batch_stats, batch)
    assert float(got["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-5)
    assert float(got["loss"]) != pytest.approx(float(plain(state.params, state.batch_stats, batch)["loss"]), rel=1e-4)
    with pytest.raises(ValueError, match="eval.tta"):
        make_eval_step(model, 3, mesh, IMAGES, tta="ten_crop")


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_large_batch_optimisers_train(name):
    _, step, state, batch, _ = _setup(optimizer=name)
    losses = []
    for _ in range(4):
        state, sums = step(state, batch)
        losses.append(float(sums["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("key,value,allowed", [
    ("data.augment.mixup", -0.1, "a Beta alpha"),
    ("train.ema_decay", 1.0, r"a decay in \(0, 1\)"),
    ("train.accumulate_steps", 3, "must divide train.batch_size=32"),
    ("train.class_weights", "inverse", "choose from none, balanced"),
    ("train.early_stopping_patience", -1, "0 \\(off\\) or a number of epochs"),
    ("eval.tta", "ten_crop", "choose from none, flip"),
    ("optimizer.name", "adagrad", "choose from sgd, adamw, lars, lamb"),
])
def test_bad_recipe_values_are_errors_naming_the_key(key, value, allowed):
    config = base_config()
    config.data.path = "x"
    section, name = key.rsplit(".", 1)
    node = config
    for part in section.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(ConfigError, match=f"{key}.*{allowed}"):
        check_values(config)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("colours"), per_class=12)


@pytest.mark.slow
def test_early_stopping_stops_and_keeps_the_best(colours, tmp_path):
    """Only the head trains (BatchNorm statistics frozen), at a learning rate too small to change anything: the val
    accuracy never improves after epoch 1, so with patience 2 the run stops after epoch 3 of 8 and keeps epoch 1's
    model."""
    config = tiny_config(colours, **{"train.epochs": 8, "optimizer.lr": 1e-12, "train.early_stopping_patience": 2,
                                     "data.test_fraction": 0.25, "transfer.strategy": "custom",
                                     "transfer.rules": (("head/.*", 1.0), (".*", 0.0))})
    summary = train_and_evaluate(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert summary["stopped_early"] is True and summary["best_epoch"] == 1 and summary["epochs"] == 3
    again = train_and_evaluate(config, tmp_path)  # rerun: stays stopped, trains nothing more
    assert again["steps"] == summary["steps"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


EVERYTHING = {"train.epochs": 4, "train.checkpoint_every_steps": 4, "data.val_fraction": 0.25,
              "optimizer.name": "adamw", "head.dropout": 0.3, "data.augment.mixup": 0.8, "data.augment.cutmix": 1.0,
              "train.ema_decay": 0.9, "train.accumulate_steps": 2, "train.class_weights": "balanced",
              "eval.tta": "flip", "model.kwargs": {"width": 8, "drop_path_rate": 0.1},
              "data.augment.policy": "randaugment", "data.augment.magnitude": 12, "data.augment.num_ops": 3,
              "data.augment.color_jitter": 0.4, "data.augment.random_erasing": 0.25}


@pytest.mark.slow
def test_a_run_with_every_recipe_key_on_resumes_exactly(colours, tmp_path):
    straight_dir = tmp_path / "straight"
    reference = train_and_evaluate(tiny_config(colours, **EVERYTHING), straight_dir)
    records = [json.loads(line) for line in (straight_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("raw_val_accuracy" in r for r in records)  # the raw weights' metrics beside the EMA's
    workdir, _ = killed_and_resumed(tmp_path, colours, EVERYTHING)
    resumed = json.loads((workdir / "summary.json").read_text())
    for key in ("best_val_accuracy", "final_val_accuracy", "steps", "best_epoch"):
        assert resumed[key] == reference[key], key
    assert resumed["final_val"]["loss"] == pytest.approx(reference["final_val"]["loss"], rel=1e-6)
    mine = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(mine, records):
        np.testing.assert_allclose([a["train_loss"], a["val_loss"], a["raw_val_loss"]],
                                   [b["train_loss"], b["val_loss"], b["raw_val_loss"]], rtol=1e-6)


@pytest.mark.parametrize("family", ["resnet", "lite", "vgg", "mobilenet_v2", "vit"])
def test_layer_decay_multipliers_fall_by_one_factor_per_block_below_the_head(family):
    from jaxtl.models.classifier import Classifier
    from jaxtl.rules import tree_paths
    from jaxtl.transfer.recipe import layer_decay_multipliers, layer_depths
    from tests.conftest import TinyEfficientNetLite, TinyMobileNetV2, TinyResNet, TinyVGG, TinyViT

    backbone = {"resnet": TinyResNet, "lite": TinyEfficientNetLite, "vgg": TinyVGG, "mobilenet_v2": TinyMobileNetV2,
                "vit": TinyViT}[family]()
    model = Classifier(backbone, 3)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    depths, head = layer_depths(params, backbone.groups)
    by_path = dict(zip(jax.tree_util.tree_leaves(tree_paths(params)), jax.tree_util.tree_leaves(depths)))
    assert {d for p, d in by_path.items() if p.startswith("head/")} == {head}
    first_group = backbone.groups[0]
    assert min(d for p, d in by_path.items() if p.startswith(f"backbone/{first_group}/")) == 0
    # blocks in order: every depth from 0 to the head is used, each block one deeper than the one before
    assert sorted(set(by_path.values())) == list(range(head + 1))
    blocks = [(p.split("/")[1], p.split("/")[2]) for p in by_path if p.startswith("backbone/stage")
              and p.split("/")[2].startswith(("block", "conv"))]
    order = sorted(set(blocks), key=lambda gb: (backbone.groups.index(gb[0]), int(gb[1].lstrip("blockconv"))))
    block_depths = [by_path[next(p for p in by_path if p.startswith(f"backbone/{g}/{b}/"))] for g, b in order]
    assert block_depths == sorted(block_depths) and len(set(block_depths)) == len(block_depths)
    multipliers = layer_decay_multipliers(params, backbone.groups, 0.5)
    for path, m in zip(jax.tree_util.tree_leaves(tree_paths(params)), jax.tree_util.tree_leaves(multipliers)):
        assert m == pytest.approx(0.5 ** (head - by_path[path]))


def test_layer_decay_composes_with_a_strategy_and_trains(colours, tmp_path):
    """finetune_top with layer decay: frozen groups stay frozen (no optimizer state), the trainable ones decay."""
    config = tiny_config(colours, **{"transfer.strategy": "finetune_top", "transfer.num_stages": 2,
                                     "optimizer.layer_decay": 0.5, "train.epochs": 1})
    summary = train_and_evaluate(config, tmp_path)
    assert np.isfinite(summary["final_val"]["loss"])
    from jaxtl.rules import tree_paths
    from jaxtl.train import plan as plans
    from jaxtl.train.restore import load_trained
    from jaxtl.transfer.recipe import layer_decay_multipliers

    model, initial = plans.model_plan(config).create(len(summary["classes"]))
    _, trained, _, _ = load_trained(tmp_path)
    leaves = jax.tree_util.tree_leaves

    def by_path(tree):
        return dict(zip(leaves(tree_paths(tree)), leaves(tree)))

    before, after = by_path(initial["params"]), by_path(trained["params"])
    frozen = {p for p in before if p.split("/")[1] in ("stem", "stage1", "stage2")}
    trainable = set(before) - frozen
    assert frozen and all(np.array_equal(before[p], after[p]) for p in frozen)  # bit for bit
    stats_before, stats_after = by_path(initial["batch_stats"]), by_path(trained["batch_stats"])
    assert all(np.array_equal(stats_before[p], stats_after[p]) for p in stats_before if p.split("/")[1] in
               ("stem", "stage1", "stage2"))
    assert all(not np.array_equal(before[p], after[p]) for p in trainable if p.endswith("kernel"))
    # the trainable groups' LR multipliers fall by the factor per block below the head: stage3's below stage4's
    decay = by_path(layer_decay_multipliers(initial["params"], model.backbone.groups, 0.5))
    assert max(decay[p] for p in trainable if "/stage3/" in p) < min(decay[p] for p in trainable if "/stage4/" in p)
    # frozen parameters hold no optimizer state: SGD's one trace per trainable parameter
    count = sum(before[p].size for p in trainable)
    assert summary["trainable_params"] == count and 4 * count <= summary["optimizer_state_bytes"] <= 4 * count + 256


@pytest.mark.slow
def test_lr_find_sweeps_plots_and_suggests_an_lr_where_the_loss_falls(colours, tmp_path, capsys):
    from jaxtl.cli import main

    config = tiny_config(colours)
    path = config_file(tmp_path, colours)
    main(["lr-find", "--config", str(path), "--workdir", str(tmp_path / "find"), "--steps", "60",
          "--start-lr", "1e-5", "--end-lr", "100"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads((tmp_path / "find" / "lr_find.json").read_text())
    assert (tmp_path / "find" / "lr_find.png").stat().st_size > 0
    lrs, smoothed = np.asarray(written["lrs"]), np.asarray(written["smoothed"])
    assert np.all(np.diff(lrs) > 0) and lrs[0] == pytest.approx(1e-5)
    assert printed["suggested_lr"] == written["suggested_lr"] and 1e-5 <= written["suggested_lr"] <= 100
    at = int(np.argmin(np.abs(lrs - written["suggested_lr"])))
    assert smoothed[min(at + 3, len(lrs) - 1)] < smoothed[max(at - 3, 0)]  # the loss falls around the suggestion
    assert len(lrs) < 60 or smoothed[-1] > smoothed.min()  # it either blew up and stopped, or rose at the end
    assert config.optimizer.lr == 0.05  # nothing of the config changed
    with pytest.raises(SystemExit) as exit_info:
        main(["lr-find", "--config", str(path), "--workdir", str(tmp_path / "find"), "--steps", "2"])
    assert exit_info.value.code == 2
