"""`report.html`: written by every `train`, rebuilt by `run.py report`; its numbers are summary.json's, its pictures
decode, and Grad-CAM matches the closed form where there is one."""

from __future__ import annotations

import base64
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxtl.cli import main
from jaxtl.report.cam import grad_cam, last_map
from jaxtl.weights.create import create_model
from tests.conftest import make_image_folder
from tests.helpers import config_file, forward


def _keyed(page: str) -> dict[str, str]:
    return dict(re.findall(r'data-key="([^"]+)" data-value="([^"]+)"', page))


def _pictures(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with val and test folders, trained through the command line (which writes the report)."""
    root = tmp_path_factory.mktemp("report")
    data = make_image_folder(root / "data", per_class=6, splits=("train", "val", "test"), textured=True)
    workdir = root / "run"
    config = config_file(root, data, {"train.epochs": 2, "data.val_fraction": 0.2}, name="tiny_report.py")
    main(["train", "--config", str(config), "--workdir", str(workdir)])
    return workdir


@pytest.mark.slow
def test_train_leaves_a_report_whose_numbers_are_the_summarys(run):
    summary = json.loads((run / "summary.json").read_text())
    page = (run / "report.html").read_text()
    keyed = _keyed(page)
    assert float(keyed["test_accuracy"]) == summary["test_accuracy"]
    assert float(keyed["best_val_accuracy"]) == summary["best_val_accuracy"]
    assert int(keyed["epochs"]) == summary["epochs"]
    assert {k: int(v) for k, v in keyed.items() if k.startswith("splits.")} == {
        f"splits.{k}": v for k, v in summary["splits"].items()}
    per_class = summary["best_checkpoint_test"]["per_class_accuracy"]
    assert [float(keyed[f"best_checkpoint_test.per_class_accuracy.{i}"]) for i in range(3)] == per_class
    for heading in ("Learning curves", "Confusion matrix (test, kept model", "Per-class accuracy",
                    "Most confidently wrong val images", "Grad-CAM", "Resolved config"):
        assert heading in page
    assert '"strategy": "scratch"' in page  # the resolved config, as config.json has it
    assert re.search(r"\.card\{[^}]*overflow-wrap:anywhere", page)  # long file names wrap inside their card
    pictures = _pictures(page)
    assert len(pictures) >= 2 + 3  # curves, confusion matrix, a Grad-CAM card per class at least
    for picture in pictures:
        picture.load()  # each decodes
        assert picture.size[0] > 0


def test_report_command_rebuilds_it(run, capsys, monkeypatch):
    """The page names the workdir as it was given (a picture of it shows no path of the machine it was made on)."""
    before = _keyed((run / "report.html").read_text())
    (run / "report.html").unlink()
    monkeypatch.chdir(run.parent)
    main(["report", "--workdir", run.name])
    assert "report.html" in capsys.readouterr().out
    page = (run / "report.html").read_text()
    assert _keyed(page) == before and f"<p class='muted'>{run.name}</p>" in page


def test_report_of_an_unfinished_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no summary.json" in err and "Traceback" not in err


@pytest.mark.slow
def test_grad_cam_equals_the_closed_form_of_a_pooled_linear_head():
    """ResNet's logits are `W^T mean_hw(A) + b` of its last stage A, so d logit_c / dA = W[:, c] / (H W) everywhere:
    Grad-CAM is relu(A . W[:, c]) up to scale."""
    model, variables = create_model("resnet18", None, 4, width=8)
    images = jax.random.normal(jax.random.key(0), (3, 64, 64, 3))
    classes = np.array([0, 2, 3])
    cams = grad_cam(model, variables, images, classes)
    features = forward(model, variables, images, train=False)[1]
    assert last_map(model.backbone, features) == "stage4"
    kernel = variables["params"]["head"]["fc"]["kernel"]
    expected = jax.nn.relu(jnp.einsum("bhwk,kb->bhw", features["stage4"], kernel[:, classes]))
    expected = expected / expected.max(axis=(1, 2), keepdims=True)
    assert cams.shape == (3, 2, 2)
    np.testing.assert_allclose(cams, expected, atol=1e-5)


@pytest.mark.slow
def test_grad_cam_on_vit_tokens_has_the_patch_grid():
    model, variables = create_model("vit_ti16", None, 3)
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    cams = grad_cam(model, variables, images, np.array([0, 1]))
    assert cams.shape == (2, 4, 4) and np.all((cams >= 0) & (cams <= 1)) and np.allclose(cams.max(axis=(1, 2)), 1)
    features = forward(model, variables, images, train=False)[1]
    assert last_map(model.backbone, features) == "stage3"  # the last stage's patch tokens never reach the class token



@pytest.mark.parametrize("name,kwargs", [("efficientnet_lite0", {"width_divisor": 8}),
                                         ("vgg11", {"width_divisor": 16})])
@pytest.mark.slow
def test_grad_cam_from_the_maps_a_forward_pass_gave_equals_the_whole_networks(name, kwargs):
    """The report's Grad-CAM differentiates from the last stage's maps on (the top alone); it must be the
    interceptor's gradient through the whole network."""
    model, variables = create_model(name, None, 3, **kwargs)
    images = jax.random.normal(jax.random.key(2), (3, 64, 64, 3))
    classes = np.array([2, 0, 1])
    features = forward(model, variables, images, train=False)[1]
    layer = last_map(model.backbone, features)
    whole = grad_cam(model, variables, images, classes, layer)
    from_maps = grad_cam(model, variables, images, classes, layer, maps=features[layer])
    assert whole.max() > 0
    np.testing.assert_allclose(from_maps, whole, atol=1e-5)
