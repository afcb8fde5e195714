"""`run.py export` and `predict --onnx`: each format, run by its own runtime (onnxruntime, TensorFlow, the TFLite
interpreter), gives the kept model's probabilities on real photos; what is stored with it suffices to serve it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxtl.cli import main
from jaxtl.data.preprocess import eval_pixels
from jaxtl.serving.export import ExportError, export, servable
from jaxtl.serving.onnx_runtime import OnnxModel
from jaxtl.train.run import train_and_evaluate
from tests.conftest import make_image_folder, tiny_config
from tests.helpers import cli, one_line_error

# One tiny run per family at 32x32: the ResNet fine-tuned on images (with flip TTA, which the export must include),
# the others a linear probe on their features (the kept model is the whole network with the fitted head, exported
# the same way; only the ResNet pays for compiling a training step).
PROBE = {"transfer.strategy": "linear_probe"}
FAMILIES = {
    "resnet": {"eval.tta": "flip", "train.epochs": 1},
    "efficientnet_lite": {"model.name": "efficientnet_lite0", "model.kwargs": {"width_divisor": 8}} | PROBE,
    "mobilenet_v2": {"model.name": "mobilenet_v2", "model.kwargs": {"width": 0.25}} | PROBE,
    "vit": {"model.name": "vit_ti16", "model.kwargs": {}} | PROBE,
}


@pytest.fixture(scope="module")
def photos(data_dir):
    """Real photos, through jaxtl's host transform at the runs' input size: uint8 (6, 32, 32, 3)."""
    files = sorted((data_dir / "hymenoptera_data" / "val" / "bees").iterdir())[:6]
    return files


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A workdir per family (`FAMILIES`), the ResNet trained one epoch."""
    root = tmp_path_factory.mktemp("export")
    data = make_image_folder(root / "data", per_class=8, textured=True)
    workdirs = {}
    for family, overrides in FAMILIES.items():
        cache = {"features.cache_dir": str(root / "cache")} if overrides.get("transfer.strategy") else {}
        config = tiny_config(data, **overrides | cache)
        train_and_evaluate(config, root / family)
        workdirs[family] = root / family
    return workdirs


def _pixels(files, model) -> np.ndarray:
    return np.stack([eval_pixels(f, model.prep) for f in files])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_onnx_and_savedmodel_give_the_kept_models_probabilities(runs, photos, family, tmp_path):
    import tensorflow as tf

    model = servable(runs[family])
    images = _pixels(photos, model)
    expected = np.asarray(jax.jit(model.probabilities)(model.variables, images))
    assert expected.shape == (6, 3) and np.allclose(expected.sum(1), 1, atol=1e-5)

    export(runs[family], "onnx", tmp_path / "model.onnx")
    onnx_model = OnnxModel(tmp_path / "model.onnx")
    assert onnx_model.classes == ("blue", "green", "red") and onnx_model.prep == model.prep
    np.testing.assert_allclose(onnx_model.probabilities(images), expected, atol=1e-4)
    np.testing.assert_allclose(onnx_model.probabilities(images[:1]), expected[:1], atol=1e-4)  # dynamic batch

    export(runs[family], "savedmodel", tmp_path / "savedmodel")
    serve = tf.saved_model.load(str(tmp_path / "savedmodel")).signatures["serving_default"]
    np.testing.assert_allclose(serve(images=tf.constant(images))["probabilities"].numpy(), expected, atol=1e-4)
    stored = json.loads((tmp_path / "savedmodel" / "assets.extra" / "jaxtl.json").read_text())
    assert stored["classes"] == ["blue", "green", "red"] and stored["input"]["dtype"] == "uint8"


@pytest.mark.slow
def test_flip_tta_is_part_of_the_export(runs, photos):
    model = servable(runs["resnet"])
    assert model.metadata["tta"] == "flip"
    images = _pixels(photos, model)
    module_probs = np.asarray(model(images))
    mirrored = np.asarray(model(images[:, :, ::-1]))
    np.testing.assert_allclose(module_probs, mirrored, atol=1e-5)  # averaged with its mirror: symmetric


@pytest.mark.slow
def test_tflite_gives_the_kept_models_probabilities(runs, photos, tmp_path):
    import tensorflow as tf

    model = servable(runs["efficientnet_lite"])
    images = _pixels(photos, model)
    export(runs["efficientnet_lite"], "tflite", tmp_path / "model.tflite")
    interpreter = tf.lite.Interpreter(model_path=str(tmp_path / "model.tflite"))
    runner = interpreter.get_signature_runner("serving_default")
    got = runner(images=images)["probabilities"]
    np.testing.assert_allclose(got, np.asarray(model(images)), atol=1e-4)
    assert json.loads((tmp_path / "model.tflite.json").read_text())["classes"] == ["blue", "green", "red"]


@pytest.mark.slow
def test_predict_onnx_equals_predict_workdir(runs, photos, tmp_path, capsys):
    main(["export", "--workdir", str(runs["mobilenet_v2"]), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert "uint8 RGB (batch, 32, 32, 3)" in capsys.readouterr().out
    results = {}
    for flag, value in (("--onnx", tmp_path / "m.onnx"), ("--workdir", runs["mobilenet_v2"])):
        main(["predict", flag, str(value), "--json", "--top", "3", *map(str, photos)])
        results[flag] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results["--onnx"]) == len(photos)
    for a, b in zip(results["--onnx"], results["--workdir"]):
        assert a["path"] == b["path"] and [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        np.testing.assert_allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], atol=1e-4)


def test_export_bad_input_is_one_line(runs, tmp_path, capsys):
    cases = [
        (["--workdir", str(tmp_path / "none"), "--format", "onnx"], "config.json not found"),
        (["--workdir", str(runs["resnet"]), "--format", "pt"], "invalid choice: 'pt'"),
    ]
    empty = tmp_path / "started"
    empty.mkdir()
    (empty / "config.json").write_text((runs["resnet"] / "config.json").read_text())
    cases.append((["--workdir", str(empty), "--format", "onnx"], "no kept model"))
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", *args, "--out", str(tmp_path / "out.onnx")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
        assert not (tmp_path / "out.onnx").exists()


def test_export_never_replaces_what_is_not_its_own(runs, tmp_path):
    """`--out` is checked before any work: a folder of the user's files is never replaced by a SavedModel, a folder
    is no ONNX or TFLite file, and a path under a file is no path; each is one line and exit 2, nothing written."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "a_file").write_text("x")
    cases = [("savedmodel", mine, "is a folder of other files, not a SavedModel jaxtl wrote"),
             ("onnx", mine, "is a folder; onnx is one file"), ("tflite", mine, "is a folder; tflite is one file"),
             ("onnx", tmp_path / "a_file" / "model.onnx", "is a file, not a folder")]
    for fmt, out, message in cases:
        result = cli("export", "--workdir", runs["resnet"], "--format", fmt, "--out", out)
        one_line_error(result, out, message)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "mine"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("export", "--workdir", runs["resnet"], "--format", "savedmodel", "--out", empty).returncode == 0
    assert (empty / "saved_model.pb").is_file()
    assert cli("export", "--workdir", runs["resnet"], "--format", "savedmodel", "--out", empty).returncode == 0


def test_a_conversion_failure_names_the_format_and_keeps_the_old_export(runs, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    export(runs["resnet"], "onnx", out)
    before = out.read_bytes()

    def refuse(*args, **kwargs):
        raise NotImplementedError("No ONNX handler for primitive 'erf_inv'")

    monkeypatch.setattr("jax2onnx.to_onnx", refuse)
    with pytest.raises(ExportError, match="cannot be written as onnx: No ONNX handler for primitive 'erf_inv'"):
        export(runs["resnet"], "onnx", out)
    assert out.read_bytes() == before  # the earlier export is untouched


@pytest.mark.slow
def test_predict_onnx_refuses_a_foreign_file_and_damaged_metadata(runs, photos, tmp_path, caplog):
    import onnx

    (tmp_path / "x.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        OnnxModel(tmp_path / "x.onnx")
    caplog.set_level("INFO")
    export(runs["resnet"], "onnx", tmp_path / "model.onnx")
    assert not [r for r in caplog.records if r.name.startswith("onnx_ir")]  # no converter notices burying jaxtl's
    for name, damage in (("cut", lambda text: text[: len(text) // 2]),
                         ("no_classes", lambda text: json.dumps({k: v for k, v in json.loads(text).items()
                                                                  if k != "classes"})),
                         ("a_list", lambda text: "[1, 2]")):
        proto = onnx.load(str(tmp_path / "model.onnx"))
        (entry,) = [e for e in proto.metadata_props if e.key == "jaxtl"]
        entry.value = damage(entry.value)
        onnx.save(proto, str(tmp_path / f"{name}.onnx"))
        one_line_error(cli("predict", "--onnx", tmp_path / f"{name}.onnx", photos[0]), tmp_path / f"{name}.onnx",
                       "'jaxtl' metadata", "is damaged", "export the model again")
