"""Advice: the similarity signals against closed forms, the decision matrix, and the real backbone on the shared
data (hymenoptera -> small and similar; sign language digits -> different)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl.advice import matrix
from jaxtl.advice.matrix import CELLS, LARGE_PER_CLASS, decide, format_advice
from jaxtl.advice.signals import _gaussian_kl, batchnorm_shift, head_confidence
from jaxtl.cli import main
from jaxtl.config import apply_overrides, base_config, load_resolved
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.sharding import make_mesh
from jaxtl.data.folder import folder_dataset
from jaxtl.data.pipeline import batches
from jaxtl.data.preprocess import normalize
from jaxtl.models.classifier import init_variables
from tests.conftest import TinyResNet, make_image_folder


def test_head_confidence_closed_forms():
    head = {"fc": {"kernel": np.eye(4, 5, dtype=np.float32), "bias": np.zeros(5, np.float32)}}
    uniform = head_confidence(np.zeros((3, 4), np.float32), head)
    assert uniform["mean_top1_prob"] == pytest.approx(0.2) and uniform["mean_normalized_entropy"] == pytest.approx(1.0)
    sure = head_confidence(np.eye(4, dtype=np.float32)[:2] * 50, head)
    assert sure["mean_top1_prob"] == pytest.approx(1.0) and sure["mean_normalized_entropy"] == pytest.approx(0, abs=1e-6)


def test_gaussian_kl_matches_monte_carlo():
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 2.0, 400_000)
    log_p = -0.5 * ((x - 0.5) / 2.0) ** 2 - np.log(2.0)
    log_q = -0.5 * ((x + 0.2) / 1.5) ** 2 - np.log(1.5)
    assert _gaussian_kl(0.5, 4.0, -0.2, 2.25) == pytest.approx(np.mean(log_p - log_q), rel=1e-2)
    assert _gaussian_kl(1.0, 3.0, 1.0, 3.0) == 0.0


@pytest.mark.slow
def test_batchnorm_shift_is_zero_where_running_statistics_are_the_data_s(tmp_path):
    split = folder_dataset(make_image_folder(tmp_path, per_class=4), val_fraction=0.0).splits["train"]
    prep = Preprocessing(input_size=32)
    model = TinyResNet()
    variables = init_variables(model, jax.random.key(0))
    # The stem BatchNorm's input is the stem conv of the images: give it exactly the data's statistics.
    images = normalize(np.concatenate([b["images"] for b in batches(split, prep, 12, train=False)]), prep)
    conv = jax.lax.conv_general_dilated(jnp.asarray(images), variables["params"]["stem"]["conv"]["kernel"], (2, 2),
                                        ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    stats = jax.tree_util.tree_map(np.array, variables["batch_stats"])
    stats["stem"]["bn"] = {"mean": np.asarray(conv.mean((0, 1, 2))), "var": np.asarray(conv.var((0, 1, 2)))}
    matched = {"params": variables["params"], "batch_stats": stats}
    shift = batchnorm_shift(model, matched, split, prep, make_mesh(), batch_size=5)
    assert shift["images"] == 12 and shift["layers"] == 1 + 2 * 4 + 3  # stem, 2 per block, downsample of stages 2-4
    assert shift["per_group"]["stem"] == pytest.approx(0.0, abs=1e-4)
    assert shift["per_group"]["stage1"] > 0.01  # random init statistics (mean 0, var 1) are not the data's
    darker = batchnorm_shift(model, matched, split, Preprocessing(input_size=32, mean=(0.9, 0.9, 0.9)), make_mesh())
    assert darker["per_group"]["stem"] > 0.1


def _measured(per_class=100, confidence=0.7, shift=0.05, last=0.9, earlier=0.85, classes=3):
    probe = [{"layers": layers, "val_accuracy": acc, "val_loss": 1 - acc, "l2": 1.0} for layers, acc in (
        (["stage2"], 0.6), (["stage3"], 0.7), (["pre_logits"], last), (["stage3", "pre_logits"], earlier),
        (["stage2", "stage3", "pre_logits"], earlier - 0.01))]
    return {"model": "m", "weights": "w", "input_size": 224, "seconds": 1.0,
            "size": {"classes": classes, "train_images": classes * per_class, "val_images": 30,
                     "median_train_per_class": per_class, "min_train_per_class": per_class},
            "head_confidence": {"mean_top1_prob": confidence}, "batchnorm_shift": {"mean_kl": shift},
            "layer_probe": probe}


@pytest.mark.parametrize("measured,cell,strategy", [
    (_measured(), "linear probe on pre-logits", "linear_probe"),
    (_measured(confidence=0.1, shift=0.5, earlier=0.95), "linear probe on earlier layers", "linear_probe"),
    (_measured(per_class=300, classes=10), "fine-tune the top stages", "finetune_top"),  # the 3,068 photos
    (_measured(per_class=300, classes=10, confidence=0.2, shift=0.3), "fine-tune the top and earlier stages",
     "finetune_top"),
    (_measured(per_class=LARGE_PER_CLASS, classes=20), "fine-tune the top, or all at a low LR", "finetune_top"),
    (_measured(per_class=5000, confidence=0.2, shift=0.3), "fine-tune everything", "finetune_all"),
    (_measured(confidence=0.2), "linear probe on pre-logits", "linear_probe"),  # 2 of 3 say similar
])
def test_matrix_cells_and_runnable_overrides(measured, cell, strategy):
    advice = decide(measured)
    assert advice["cell"] == cell and advice["strategy"] == strategy
    assert len(advice["candidates"]) == 6 and advice["candidates"][0]["name"] == advice["chosen"]
    for candidate in advice["candidates"]:  # every candidate's overrides make a valid config
        config = apply_overrides(base_config(), candidate["overrides"])
        assert config.transfer.strategy == candidate["overrides"][0].split("=")[1]
    config = apply_overrides(base_config(), advice["overrides"])
    if cell == "linear probe on earlier layers":
        assert config.head.layers == ("stage3", "pre_logits")
    text = format_advice(advice, "data")
    assert text.count("[x]") == 1 and f"[x] {cell}" in text and text.count("[ ]") == len(CELLS) - 1


def _advise_json(data, capsys):
    capsys.readouterr()
    main(["advise", "--data", str(data), "--json"])
    return json.loads(capsys.readouterr().out)


def _sign_digits_subset(data_dir, root, per_class=50):
    """Every fourth photo of each sign-language digit, `per_class` a digit (of about 205), copied under `root`."""
    for digit in sorted((data_dir / "sign_language_digits").iterdir()):
        (root / digit.name).mkdir(parents=True)
        for photo in sorted(digit.iterdir())[::4][:per_class]:
            shutil.copy(photo, root / digit.name / photo.name)
    return root


@pytest.mark.slow
@pytest.mark.optimized
def test_advice_on_the_shared_data_and_auto_training(data_dir, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXTL_DATA_DIR", str(data_dir))
    # transfer.strategy=auto measures hymenoptera (as `advise` does), writes the advice and trains what it chose
    caplog.set_level("INFO", logger="jaxtl")
    workdir = tmp_path / "auto"
    main(["train", "--config", "configs/ants_bees.py", "--workdir", str(workdir), "--strategy", "auto",
          "--config.progress=False"])
    ants = json.loads((workdir / "advice.json").read_text())
    assert (ants["size"], ants["similarity"]) == ("small", "similar")
    assert ants["cell"] == "linear probe on pre-logits" and ants["chosen"] == "probe_pre_logits"
    assert "head.layers=('pre_logits',)" in ants["overrides"]
    assert {row["name"] for row in ants["trials"]["rows"]} == {"probe_pre_logits", "probe_earlier"}
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["strategy"] == "linear_probe" and summary["best_val_accuracy"] > 0.9
    assert "feature cache miss" not in caplog.text.split("follows the advice")[-1]  # trains on the probe's features
    page = (workdir / "report.html").read_text()  # the report shows the advice and the trials that chose
    assert "Advice (auto)" in page and "[x] linear probe on pre-logits" in page
    for row in ants["trials"]["rows"]:
        assert f"<td>{row['name']}</td>" in page and f">{row['val_accuracy']:.4g}<" in page
    capsys.readouterr()
    assert load_resolved(workdir).transfer.strategy == "linear_probe"  # what auto chose, for eval and predict
    main(["eval", "--workdir", str(workdir), "--config.progress=False"])
    assert json.loads(capsys.readouterr().out)["val"]["accuracy"] == pytest.approx(summary["best_val_accuracy"])

    # The sign language digits, a quarter of the photos (500) against size tiers a quarter of the notes': what the
    # whole set (1,651 training images, 165 a class) is by the notes' own, measured in a quarter of the time
    monkeypatch.setattr(matrix, "MEDIUM_TOTAL", matrix.MEDIUM_TOTAL // 4)
    monkeypatch.setattr(matrix, "MEDIUM_PER_CLASS", matrix.MEDIUM_PER_CLASS // 4)
    signs = _advise_json(_sign_digits_subset(data_dir, tmp_path / "signs"), capsys)
    assert (signs["size"], signs["similarity"]) == ("medium", "different")  # 400 training images, 40 a class
    assert signs["cell"] == "fine-tune the top and earlier stages"
    for signal in ("head_confidence", "batchnorm_shift"):  # the two model-based signals, by a wide margin
        assert not signs["signals"][signal]["similar"] and ants["signals"][signal]["similar"]
    assert signs["measured"]["head_confidence"]["mean_top1_prob"] < 0.5 * ants["measured"]["head_confidence"][
        "mean_top1_prob"]
    assert signs["measured"]["batchnorm_shift"]["mean_kl"] > 2 * ants["measured"]["batchnorm_shift"]["mean_kl"]


def test_signals_a_backbone_lacks_are_left_out_and_a_tie_goes_to_the_batchnorm_shift():
    headless = _measured(shift=0.05, earlier=0.95) | {"model": "mobilenet_v2", "head_confidence": None}
    advice = decide(headless)  # BatchNorm says similar (0.05 <= 0.09), the probe says different: a tie
    assert set(advice["signals"]) == {"batchnorm_shift", "layer_probe"}
    assert advice["similarity"] == "similar" and "1 of 2 signals" in " ".join(advice["reasons"])
    assert advice["signals"]["batchnorm_shift"]["threshold"] == 0.09  # calibrated for MobileNetV2
    no_batchnorm = _measured(confidence=0.1, earlier=0.95) | {"model": "vit_s16", "batchnorm_shift": None}
    advice = decide(no_batchnorm)
    assert set(advice["signals"]) == {"head_confidence", "layer_probe"} and advice["similarity"] == "different"
    assert any("calibrated for" in reason for reason in advice["reasons"])
