"""`weights="hf-hub:<owner>/<repo>"`: offline, against a Hub cache folder built here in the layout the
`huggingface_hub` client writes (blobs, refs, snapshots of symlinks), holding timm's files (its own random init)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from jaxtl.core.errors import ConfigError
from jaxtl.weights.convert import WeightsMismatchError
from jaxtl.weights.create import create_model, resolve_weights
from jaxtl.weights.files import WeightsUnavailableError
from jaxtl.weights.torch_file import WeightsFileError
from tests.conftest import REPO, make_image_folder

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TIMM_CFG = {"architecture": "resnet18", "num_classes": 1000, "pretrained_cfg": {
    "input_size": [3, 160, 160], "crop_pct": 0.95, "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5], "num_classes": 1000}}


def hub_repo(cache, repo: str, files: dict[str, bytes]):
    """`repo` at `COMMIT` in a Hub cache: each file a blob named by its hash, linked from the snapshot."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        blob = root / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(content)
        link = root / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root / "snapshots" / COMMIT


def timm_safetensors(name: str) -> bytes:
    import timm
    from safetensors.torch import save

    torch_model = timm.create_model(name, pretrained=False)
    return save({k: v.contiguous() for k, v in torch_model.state_dict().items()})


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hub cache (the client's own settings, as `HF_HUB_CACHE` and `HF_HUB_OFFLINE=1` set them)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "jaxtl"))  # the hashes recorded at first use
    return cache


@pytest.mark.parametrize("model,timm_name", [("resnet18", "resnet18"), ("efficientnet_lite0", "tf_efficientnet_lite0"),
                                             ("mobilenet_v2", "mobilenetv2_100"), ("vit_ti16", "vit_tiny_patch16_224")])
def test_hub_weights_equal_the_same_file_by_path(hub, model, timm_name):
    snapshot = hub_repo(hub, f"timm/{timm_name}.test", {"model.safetensors": timm_safetensors(timm_name),
                                                        "config.json": json.dumps(TIMM_CFG).encode()})
    weights = resolve_weights(model, f"hf-hub:timm/{timm_name}.test")
    assert weights.name == f"hf-hub:timm/{timm_name}.test" and weights.hub.commit == COMMIT
    assert weights.preprocessing.input_size == 160 and weights.preprocessing.crop_fraction == 0.95
    assert weights.preprocessing.interpolation == "bicubic" and weights.preprocessing.mean == (0.5, 0.5, 0.5)
    _, from_hub = create_model(model, weights)
    _, from_path = create_model(model, str(snapshot / "model.safetensors"))
    assert jax.tree_util.tree_structure(from_hub) == jax.tree_util.tree_structure(from_path)
    for a, b in zip(jax.tree_util.tree_leaves(from_hub), jax.tree_util.tree_leaves(from_path)):
        np.testing.assert_array_equal(a, b)
    assert weights.identity["sha256"] == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()


def test_sha256_recorded_at_first_use_catches_a_changed_file(hub):
    snapshot = hub_repo(hub, "timm/resnet18.test", {"model.safetensors": timm_safetensors("resnet18")})
    weights = resolve_weights("resnet18", "hf-hub:timm/resnet18.test")
    assert weights.preprocessing.input_size == 224  # no config.json: the variant's default
    blob = (snapshot / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match="no longer the .* recorded when it was first used"):
        resolve_weights("resnet18", "hf-hub:timm/resnet18.test")


def test_missing_repositories_and_bad_names_say_what_is_expected(hub):
    with pytest.raises(WeightsUnavailableError, match="not in the Hub cache .*expected hf-hub:<owner>/<repo>"):
        resolve_weights("resnet18", "hf-hub:timm/resnet18.nowhere")
    with pytest.raises(ConfigError, match="expected hf-hub:<owner>/<repo>"):
        resolve_weights("resnet18", "hf-hub:resnet18")


def test_a_file_in_an_unknown_layout_lists_the_layouts(hub):
    from safetensors.numpy import save

    hub_repo(hub, "someone/odd", {"model.safetensors": save({"encoder.w": np.zeros((2, 2), np.float32)})})
    with pytest.raises(WeightsMismatchError, match="has no 'conv1.weight'"):
        create_model("resnet18", "hf-hub:someone/odd")


def test_cli_offline_missing_hub_weights_is_one_line(tmp_path):
    make_image_folder(tmp_path / "images", classes=("red",), per_class=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "run.py", "predict", "--model", "resnet18", "--weights",
                             "hf-hub:timm/resnet18.a1_in1k", str(tmp_path / "images")], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "hf-hub:timm/resnet18.a1_in1k" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


HUB_PREP = {"input_size": 32, "crop_fraction": 0.95, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    """A tiny run fine-tuned (1 epoch, 32 px) from Hub weights whose timm config.json names their own
    preprocessing (mean and std 0.5, bicubic, crop 0.95), with the weights file's reads and hashes counted; the
    commands after it find no Hub cache (they read the run's record, `plan.json`, not the weights)."""
    from huggingface_hub import constants

    from jaxtl.train.run import train_and_evaluate
    from jaxtl.weights import hub as hub_module
    from tests.conftest import tiny_config
    from tests.helpers import weight_reads

    tmp_path = tmp_path_factory.mktemp("hub_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        cache = tmp_path / "hub"
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "jaxtl"))
        hub_repo(cache, "timm/resnet18.test", {"model.safetensors": timm_safetensors("resnet18"),
                                               "config.json": json.dumps(TIMM_CFG).encode()})
        data = make_image_folder(tmp_path / "data", per_class=6, textured=True)
        config = tiny_config(data, **{"model.weights": "hf-hub:timm/resnet18.test",
                                      "transfer.strategy": "finetune_top", "train.epochs": 1})
        del config.model.kwargs["width"]  # the Hub file is the whole ResNet-18
        hashed, reads = [], weight_reads(monkeypatch)
        monkeypatch.setattr(hub_module, "sha256_file", lambda path, real=hub_module.sha256_file: (
            hashed.append(path), real(path))[1])
        summary = train_and_evaluate(config, tmp_path / "run")
    return types.SimpleNamespace(workdir=tmp_path / "run", data=data, config=config, summary=summary,
                                 hashed=hashed, reads=reads)


def _hub_prep():
    from jaxtl.core.preprocessing import Preprocessing

    return Preprocessing(**HUB_PREP)


def _expected_probabilities(run, files):
    """The kept model's class probabilities on `files` under the Hub weights' preprocessing, computed here."""
    import jax.numpy as jnp

    from jaxtl.data.preprocess import eval_pixels, normalize
    from jaxtl.features.predict import class_probabilities
    from jaxtl.train.restore import load_trained

    model, variables, prep, classes = load_trained(run.workdir)
    pixels = np.stack([eval_pixels(f, _hub_prep()) for f in files])
    return pixels, np.asarray(class_probabilities(model, variables, normalize(pixels, _hub_prep(), jnp))), classes


@pytest.mark.slow
def test_a_run_on_hub_weights_records_their_identity_and_preprocessing_reading_them_once(hub_run):
    """Checked, planned, trained: the Hub file resolved and hashed once, read once; its identity (repository,
    commit) and the preprocessing its config.json names in the run's record."""
    from jaxtl.train.plan import RECORD_FILE

    assert len(hub_run.hashed) == 1 and len(hub_run.reads) == 1
    record = json.loads((hub_run.workdir / RECORD_FILE).read_text())
    assert record["weights"]["hub"] == "hf-hub:timm/resnet18.test" and record["weights"]["commit"] == COMMIT
    assert record["preprocessing"] == HUB_PREP | {"mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.mark.slow
def test_eval_of_a_hub_run_gives_the_val_loss_its_training_measured(hub_run):
    from jaxtl.train.restore import evaluate_checkpoint, load_trained

    assert load_trained(hub_run.workdir)[2] == _hub_prep()
    evaluated = evaluate_checkpoint(hub_run.workdir)
    assert evaluated["val"]["loss"] == pytest.approx(hub_run.summary["final_val"]["loss"], rel=1e-6)


@pytest.mark.slow
def test_predict_workdir_of_a_hub_run_gives_its_probabilities(hub_run):
    from tests.helpers import cli

    files = sorted((hub_run.data / "red").iterdir())[:4]
    _, expected, classes = _expected_probabilities(hub_run, files)
    predicted = cli("predict", "--workdir", hub_run.workdir, "--json", "--top", "3", *files)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    for line, row in zip(predicted.stdout.splitlines(), expected, strict=True):
        top = json.loads(line)["top"]
        np.testing.assert_allclose([t["prob"] for t in top], np.sort(row)[::-1], rtol=1e-5)
        assert [t["label"] for t in top] == [classes[i] for i in np.argsort(-row)]


@pytest.mark.slow
def test_an_onnx_export_of_a_hub_run_gives_its_probabilities(hub_run, tmp_path):
    from jaxtl.serving.export import export
    from jaxtl.serving.onnx_runtime import OnnxModel

    files = sorted((hub_run.data / "blue").iterdir())[:4]
    pixels, expected, _ = _expected_probabilities(hub_run, files)
    export(hub_run.workdir, "onnx", tmp_path / "model.onnx")
    onnx_model = OnnxModel(tmp_path / "model.onnx")
    assert onnx_model.prep == _hub_prep()
    np.testing.assert_allclose(onnx_model.probabilities(pixels), expected, atol=1e-5)


@pytest.mark.slow
def test_the_report_of_a_hub_run_scores_val_with_its_preprocessing(hub_run):
    """The report's val images are scored by the kept model under the recorded preprocessing: its probabilities
    are the ones computed here, and the page shows them."""
    from jaxtl.report.html import _scored_val, build_report

    _, _, prep, split, index, _, probs, _, _ = _scored_val(hub_run.workdir, seed=0)
    assert prep == _hub_prep()
    files = [split.files[i] for i in index]
    np.testing.assert_allclose(probs, _expected_probabilities(hub_run, files)[1], atol=1e-5)
    page = build_report(hub_run.workdir).read_text()
    predicted = probs.argmax(1)
    shown = {f"({probs[i, predicted[i]]:.2f})" for i in range(len(probs))}
    assert sum(text in page for text in shown) >= 1  # the Grad-CAM cards' captions: the kept model's probabilities


@pytest.mark.slow
def test_a_hub_run_from_before_the_record_derives_it_once_and_a_resumed_run_reads_it(hub_run, tmp_path, caplog,
                                                                                      monkeypatch):
    """A workdir from before the record derives it once and writes it; a resumed run takes the preprocessing its
    start recorded, even when its weights call for another now, reading the record once."""
    import dataclasses
    import shutil

    from huggingface_hub import constants

    from jaxtl.train import plan as plans
    from jaxtl.train.plan import RECORD_FILE
    from jaxtl.train.restore import load_trained
    from jaxtl.train.run import check_data, make_plan

    run = tmp_path / "run"
    shutil.copytree(hub_run.workdir, run)
    record = json.loads((run / RECORD_FILE).read_text())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_run.workdir.parent / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(hub_run.workdir.parent / "jaxtl"))
    (run / RECORD_FILE).unlink()  # as a run from before the record left it
    caplog.set_level("INFO", logger="jaxtl")
    assert load_trained(run)[2] == _hub_prep() and f"has no {RECORD_FILE}" in caplog.text
    derived = json.loads((run / RECORD_FILE).read_text())
    assert derived["derived"] is True and derived["weights"] == record["weights"]  # the Hub identity, as recorded
    assert {k: derived[k] for k in ("model", "build_arguments", "strategy")} == {
        k: record[k] for k in ("model", "build_arguments", "strategy")}
    record = derived
    record["preprocessing"]["crop_fraction"] = 0.9
    (run / RECORD_FILE).write_text(json.dumps(record))
    reads = []  # the record is read once as the run starts: its preprocessing and its data from one reading
    monkeypatch.setattr(plans, "read_record", lambda workdir, read=plans.read_record: (reads.append(workdir),
                                                                                       read(workdir))[1])
    plan = check_data(make_plan(hub_run.config, run))
    assert plan.prep == dataclasses.replace(_hub_prep(), crop_fraction=0.9) and plan.record == record
    assert "it goes on with it" in caplog.text and reads == [run]
    # the derived record had no data: the fingerprint of the data it goes on with joins it
    assert json.loads((run / RECORD_FILE).read_text()) == record | {"data": plan.data_fingerprint}


def test_a_weights_file_is_read_once_within_a_run_and_again_when_it_changes(tmp_path, monkeypatch):
    """`weights_read_once` (a run's scope): the file is read and converted once for every model and backbone made
    from it; a changed file is read again; outside a run, every call reads it."""
    from jaxtl.weights.create import create_backbone, resolve_weights, weights_read_once
    from tests.helpers import weight_reads

    path = tmp_path / "resnet18.safetensors"
    path.write_bytes(timm_safetensors("resnet18"))
    reads = weight_reads(monkeypatch)
    with weights_read_once():
        _, first = create_model("resnet18", str(path), num_classes=3)
        _, second = create_model("resnet18", str(path), num_classes=3, rng=1)
        _, alone = create_backbone("resnet18", str(path))
        assert resolve_weights("resnet18", str(path)).num_classes == 1000  # what advice asks first: no read either
        assert len(reads) == 1
        np.testing.assert_array_equal(first["params"]["backbone"]["stem"]["conv"]["kernel"],
                                      alone["params"]["stem"]["conv"]["kernel"])
        assert not np.array_equal(first["params"]["head"]["fc"]["kernel"], second["params"]["head"]["fc"]["kernel"])
        path.write_bytes(timm_safetensors("resnet18"))  # timm's own random init again: other values
        assert resolve_weights("resnet18", str(path)).num_classes == 1000  # read here, converted below
        _, changed = create_model("resnet18", str(path), num_classes=3)
        assert len(reads) == 2 and not np.array_equal(changed["params"]["backbone"]["stem"]["conv"]["kernel"],
                                                      first["params"]["backbone"]["stem"]["conv"]["kernel"])
    create_model("resnet18", str(path), num_classes=3)
    create_model("resnet18", str(path), num_classes=3)
    assert len(reads) == 4


@pytest.mark.parametrize("cfg,expected", [
    ({"architecture": "resnet18"}, {}),  # only the architecture: every field the variant's
    ({"architecture": "resnet18", "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}},
     {"mean": (0.5,) * 3, "std": (0.5,) * 3}),
    ({"pretrained_cfg": {"input_size": [3, 288, 288], "crop_pct": None}}, {"input_size": 288}),  # null: the default
])
def test_a_hub_config_naming_some_preprocessing_takes_the_rest_from_the_variant(hub, cfg, expected):
    import dataclasses

    from jaxtl.weights.create import default_preprocessing

    hub_repo(hub, "timm/resnet18.part", {"model.safetensors": timm_safetensors("resnet18"),
                                         "config.json": json.dumps(cfg).encode()})
    prep = resolve_weights("resnet18", "hf-hub:timm/resnet18.part").preprocessing
    assert prep == dataclasses.replace(default_preprocessing("resnet18"), **expected)


def test_a_hub_config_with_values_timm_would_not_write_is_refused_naming_it(hub):
    snapshot = hub_repo(hub, "timm/resnet18.bad", {"model.safetensors": timm_safetensors("resnet18"),
                                                   "config.json": json.dumps({"pretrained_cfg": {
                                                       "mean": [0.5, 0.5]}}).encode()})
    with pytest.raises(WeightsFileError, match=f"{snapshot / 'config.json'}: not timm's config.json .*mean has 2 "
                                               "values, not 3"):
        resolve_weights("resnet18", "hf-hub:timm/resnet18.bad")
