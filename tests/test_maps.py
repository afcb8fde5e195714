"""`finetune_top` on cached maps (`transfer.cached_maps`, the `maps` trainer): the top stages trained on the frozen
part's maps computed once equal the whole network with that part frozen; the maps are cached, reused and
checked like the feature cache's files."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl.core.errors import ConfigError
from jaxtl.core.sharding import global_batch, make_mesh
from jaxtl.train.restore import evaluate_checkpoint
from jaxtl.train.run import check_config, train_and_evaluate
from jaxtl.train.steps import IMAGES, MAPS, step_for_rules
from jaxtl.transfer.strategies import preset_rules
from jaxtl.weights.create import create_model
from tests.conftest import make_image_folder, tiny_config
from tests.helpers import assert_same_run, forward, killed_and_resumed
from tests.test_loop import RESUMABLE

MAPS_RUN = {"transfer.strategy": "finetune_top", "transfer.num_stages": 2, "transfer.cached_maps": True,
            "train.epochs": 2, "data.val_fraction": 0.25}


@pytest.mark.parametrize("name,kwargs", [("resnet18", {"width": 8}), ("efficientnet_lite0", {"width_divisor": 8})])
@pytest.mark.slow
def test_a_step_on_cached_maps_is_the_whole_networks_step_with_the_lower_part_frozen(name, kwargs):
    model, variables = create_model(name, None, 3, **kwargs)
    groups = model.backbone.groups
    rules = preset_rules("finetune_top", groups, num_stages=2)
    entry = groups[len(groups) - 3]
    images = jax.random.normal(jax.random.key(0), (8, 64, 64, 3))
    maps = forward(model, variables, images, train=False)[1][entry]  # frozen BatchNorm: running statistics
    labels = jnp.arange(8) % 3
    mesh = make_mesh()
    top = model.clone(maps_from=entry, maps_input_size=64)
    results = []
    for net, inputs, x in ((model, IMAGES, images), (top, MAPS, maps)):
        step, state = step_for_rules(net, variables, rules, optax.constant_schedule(0.1), mesh, inputs=inputs)
        batch = global_batch({inputs.key: np.asarray(x), "labels": np.asarray(labels, np.int32),
                              "mask": np.ones(8, np.float32)}, mesh)
        compiled = step.lower(state, batch).compile()
        state, sums = compiled(state, batch)
        cost = compiled.cost_analysis()
        results.append((jax.device_get(state.params), float(sums["loss"]), cost["flops"]))
    (full_params, full_loss, full_flops), (map_params, map_loss, map_flops) = results
    assert map_loss == pytest.approx(full_loss, rel=1e-5)
    # one SGD step from the same parameters: equal updates are equal gradients
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), map_params,
                           full_params)
    # the frozen part is not in the maps step at all: a full step runs it forward once (no gradient), and that
    # forward pass is exactly what the maps step saves
    def forward_flops(net, x, method="__call__"):
        return jax.jit(lambda v, x: net.apply(v, x, method=method)[0]).lower(variables, x).compile().cost_analysis()[
            "flops"]

    lower = forward_flops(model, images) - forward_flops(top, maps, "classify_maps")
    assert lower > 0 and full_flops - map_flops == pytest.approx(lower, rel=0.05)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("maps") / "data", per_class=12, textured=True)


@pytest.mark.slow
def test_a_maps_run_caches_once_evaluates_as_the_image_model_and_reuses_the_cache(colours, tmp_path, caplog):
    caplog.set_level("INFO", logger="jaxtl")
    config = tiny_config(colours, **MAPS_RUN, **{"features.cache_dir": str(tmp_path / "cache")})
    summary = train_and_evaluate(config, tmp_path / "first")
    assert summary["trainer"] == "maps" and summary["map_cache"]["layer"] == "stage2"
    assert summary["map_cache"]["augmentation"] == ["flip"] and "Mixup/CutMix" in summary["map_cache"]["lost"]
    assert caplog.text.count("feature cache miss") == 2  # train and val, once each
    # the kept model is the whole classifier: on images it scores what it scored on the maps
    assert evaluate_checkpoint(tmp_path / "first")["val"]["accuracy"] == pytest.approx(summary["best_val_accuracy"])
    caplog.clear()
    again = train_and_evaluate(config, tmp_path / "second")
    assert "feature cache miss" not in caplog.text and again["best_val_accuracy"] == summary["best_val_accuracy"]


@pytest.mark.slow
def test_gradual_on_cached_maps_trains_its_phases_as_on_images(colours, tmp_path):
    """`gradual`'s phases (head, + stage4, + stage3) on cached stage2 maps: without augmentation, each epoch's
    val loss is the image run's, phase by phase."""
    runs = {}
    for maps in (False, True):
        config = tiny_config(colours, **{"transfer.strategy": "gradual", "transfer.phase_epochs": (1, 1, 1),
                                         "transfer.cached_maps": maps, "data.augment.enabled": False,
                                         "data.val_fraction": 0.25,
                                         **({"features.cache_dir": str(tmp_path / "cache")} if maps else {})})
        runs[maps] = train_and_evaluate(config, tmp_path / str(maps))
    on_images, on_maps = runs[False], runs[True]
    assert on_maps["trainer"] == "maps" and on_maps["map_cache"]["layer"] == "stage2"
    assert on_maps["map_cache"]["augmentation"] == [] and on_images["trainer"] == "images"
    histories = [[json.loads(line) for line in (tmp_path / str(m) / "metrics.jsonl").read_text().splitlines()]
                 for m in (False, True)]
    assert len(histories[0]) == len(histories[1]) == 3
    for phase, (image_epoch, map_epoch) in enumerate(zip(*histories)):
        assert map_epoch["phase"] == image_epoch["phase"] == phase
        assert map_epoch["train_loss"] == pytest.approx(image_epoch["train_loss"], rel=1e-4)
        assert map_epoch["val_accuracy"] == image_epoch["val_accuracy"]
        # The last phase's val loss (2.4, after one epoch of stage3's BatchNorm statistics) magnifies the two
        # programs' rounding: 2e-3 apart on an AVX2 CPU (within 1e-4 on an AVX-512 one); train losses 1e-6 apart.
        # The phases before it (the head; + stage4) agree to 1e-4 on both.
        assert map_epoch["val_loss"] == pytest.approx(image_epoch["val_loss"], rel=1e-2 if phase == 2 else 1e-4)
    with pytest.raises(ConfigError, match="whose lowest group stays frozen"):
        train_and_evaluate(tiny_config(colours, **{"transfer.strategy": "gradual", "transfer.cached_maps": True,
                                                   "transfer.phase_epochs": (1,) * 6}), tmp_path / "all")


@pytest.mark.slow
def test_a_maps_run_killed_inside_an_epoch_resumes_to_the_same_result(colours, tmp_path):
    """Killed after step 4 (inside epoch 2), rerun: every epoch's metrics and the result are the straight run's
    (batches and flips of the maps are drawn from seed, epoch and example, as on images)."""
    overrides = {**MAPS_RUN, **RESUMABLE, "features.cache_dir": str(tmp_path / "cache")}
    reference = train_and_evaluate(tiny_config(colours, **overrides), tmp_path / "straight")
    assert reference["trainer"] == "maps"
    workdir, _ = killed_and_resumed(tmp_path, colours, overrides)
    assert_same_run(workdir, reference, tmp_path / "straight")


@pytest.mark.slow
def test_a_damaged_map_file_is_recomputed(colours, tmp_path, caplog):
    caplog.set_level("INFO", logger="jaxtl")
    config = tiny_config(colours, **MAPS_RUN, **{"features.cache_dir": str(tmp_path / "cache")})
    summary = train_and_evaluate(config, tmp_path / "first")
    damaged = next((tmp_path / "cache").rglob("stage2.map.npy"))
    data = bytearray(damaged.read_bytes())
    data[-8:] = b"\xff" * 8
    damaged.write_bytes(bytes(data))
    caplog.clear()
    again = train_and_evaluate(config, tmp_path / "second")
    assert "cannot be used" in caplog.text and str(damaged) in caplog.text
    assert again["best_val_accuracy"] == summary["best_val_accuracy"]


def test_cached_maps_needs_a_cnn_and_fixed_batchnorm(colours, tmp_path):
    with pytest.raises(ConfigError, match="transfer.cached_maps=True .* needs a CNN whose lowest group stays frozen"):
        train_and_evaluate(tiny_config(colours, **MAPS_RUN, **{"model.name": "vit_ti16", "model.kwargs": {}}),
                           tmp_path / "vit")
    with pytest.raises(ConfigError, match="transfer.train_frozen_bn=True"):
        train_and_evaluate(tiny_config(colours, **MAPS_RUN, **{"transfer.train_frozen_bn": True}), tmp_path / "bn")
    with pytest.raises(ConfigError, match="transfer.cached_maps=True: set, but"):
        train_and_evaluate(tiny_config(colours, **{"transfer.cached_maps": True, "transfer.strategy": "finetune_all"}),
                           tmp_path / "all")



def test_cached_maps_takes_a_config_with_image_augmentation_and_names_what_it_drops(colours, caplog):
    """A variant that sets crop augmentation (`configs/ants_bees.py:finetune_top`) with the switch on: checked
    with a warning naming each augmentation key the maps cannot have; keys no strategy on images reads either
    are still errors."""
    caplog.set_level("WARNING", logger="jaxtl")
    augmented = {"data.augment.crop_scale": (0.35, 1.0), "data.augment.random_erasing": 0.25}
    check_config(tiny_config(colours, **MAPS_RUN, **augmented))
    assert ("data.augment.crop_scale=(0.35, 1.0), data.augment.random_erasing=0.25: transfer.cached_maps=True drops "
            "them") in caplog.text and "random resized crops" in caplog.text
    with pytest.raises(ConfigError, match="probe.max_iter=5: set, but"):
        check_config(tiny_config(colours, **MAPS_RUN, **augmented, **{"probe.max_iter": 5}))
    caplog.clear()
    check_config(tiny_config(colours, **{**MAPS_RUN, "transfer.cached_maps": False}, **augmented))  # on images: read
    assert "drops" not in caplog.text


@pytest.mark.slow
def test_train_maps_past_the_cap_are_a_stratified_subset(colours, tmp_path, caplog):
    """The tiny ResNet's stage2 maps at 32x32 are 4x4x16 float32, 1,024 bytes an image: a cap of 16 KB keeps 15 of
    the 27 training images, every class kept."""
    config = tiny_config(colours, **MAPS_RUN, **{"transfer.cached_maps_gb": 16e3 / 1e9,
                                                 "features.cache_dir": str(tmp_path / "cache")})
    summary = train_and_evaluate(config, tmp_path / "run")
    cache = summary["map_cache"]
    assert cache["train_images"] == 15 and summary["splits"]["train"] == 27
    assert cache["estimate_gb"]["train"] == pytest.approx(27 * 1024 / 1e9, abs=1e-3)
    assert "past transfer.cached_maps_gb" in caplog.text
