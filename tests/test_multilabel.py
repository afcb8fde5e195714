"""Multi-label data (`data.multi_label`): a manifest's several labels an image, sigmoid binary cross-entropy, mean
average precision and thresholds from histograms of the logits (`jaxtl.core.multilabel`), checked against direct
computations over the sorted scores and PyTorch's loss; and a built set (two shared sign-language digits side by
side, labelled with both) trained with the real EfficientNet-Lite0, by the probe and by `finetune_top`, then
evaluated, predicted, exported and reported."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl.core import multilabel
from jaxtl.core.errors import ConfigError, DataError
from jaxtl.data.sources import DataSource
from jaxtl.train.steps import loss_and_metrics
from tests.conftest import make_image_folder, tiny_config

# ---- the metrics, against direct computations -------------------------------------------------------------------


def _reference_ap(scores: np.ndarray, truth: np.ndarray) -> float:
    """scikit-learn's average precision, from its definition: over the distinct scores, highest first, the
    recall gained times the precision there."""
    ap, seen_tp, seen = 0.0, 0, 0
    for score in np.unique(scores)[::-1]:
        at = scores == score
        tp = int(truth[at].sum())
        seen_tp, seen = seen_tp + tp, seen + int(at.sum())
        ap += tp / truth.sum() * seen_tp / seen
    return ap


def _reference_f1(scores: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    predicted = scores >= threshold
    tp = int((predicted & truth).sum())
    return 2 * tp / (2 * tp + int((predicted & ~truth).sum()) + int((~predicted & truth).sum()))


def _logits_on_bins(bins: np.ndarray) -> np.ndarray:
    """Logits at the centres of `bins` (so that the histograms lose nothing)."""
    return ((bins + 0.5) * multilabel.WIDTH - multilabel.LIMIT).astype(np.float32)


def test_average_precision_thresholds_and_f1_equal_the_sorted_scores_computation():
    rng = np.random.default_rng(0)
    truth = rng.random((300, 4)) < np.array([0.1, 0.3, 0.5, 0.0])
    logits = _logits_on_bins(rng.integers(300, 700, truth.shape) + 80 * truth)  # positives higher; ties
    positives, negatives = multilabel.histograms(logits, truth)
    result = multilabel.multilabel_metrics(positives, negatives)
    for c in range(3):
        assert result["per_class_ap"][c] == pytest.approx(_reference_ap(logits[:, c], truth[:, c]), abs=1e-6)
    assert result["per_class_ap"][3] is None  # no positives: left out of the mean
    assert result["map"] == pytest.approx(np.mean(result["per_class_ap"][:3]), abs=1e-6)
    # each chosen threshold gives the best F1 any threshold gives on these scores
    for c in range(3):
        chosen = np.log(result["thresholds"][c] / (1 - result["thresholds"][c]))
        best = max(_reference_f1(logits[:, c], truth[:, c], t) for t in np.unique(logits[:, c]))
        assert _reference_f1(logits[:, c], truth[:, c], chosen) == pytest.approx(best)
        assert result["per_class_f1"][c] == pytest.approx(best)
    # F1 at one fixed threshold: micro over every decision, macro over the labels
    fixed = multilabel.f1_scores(positives, negatives, 0.5)
    predicted = logits >= 0
    tp, fp, fn = ((predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum())
    assert fixed["micro_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert fixed["per_class_f1"][1] == pytest.approx(_reference_f1(logits[:, 1], truth[:, 1], 0.0))


def test_a_threshold_lies_halfway_between_the_examples_either_side():
    truth = np.array([[1], [1], [0], [0]], bool)
    logits = np.array([[2.0], [1.0], [-1.0], [-3.0]], np.float32)
    chosen = multilabel.multilabel_metrics(*multilabel.histograms(logits, truth))["thresholds"][0]
    assert np.log(chosen / (1 - chosen)) == pytest.approx(0.0, abs=2 * multilabel.WIDTH)  # 0 to a bin or two


def test_a_threshold_near_certainty_comes_back_to_its_bin_through_summary_json():
    """Thresholds are probabilities in summary.json: one close to 1 must still name its bin when read back."""
    positives, negatives = np.zeros((1, multilabel.BINS)), np.zeros((1, multilabel.BINS))
    positives[0, 1000], negatives[0, 980] = 3, 3  # logits about 12.2 and 11.7: the best cut lies between
    chosen = json.loads(json.dumps(multilabel.multilabel_metrics(positives, negatives)["thresholds"]))[0]
    assert multilabel.threshold_bin(chosen) == (981 + 1000 + 1) // 2
    assert multilabel.f1_scores(positives, negatives, np.array([chosen]))["micro_f1"] == 1.0

def test_the_multi_label_loss_is_pytorchs_binary_cross_entropy_with_positive_weights():
    import torch

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = (rng.random((6, 5)) < 0.4).astype(np.float32)
    mask = np.array([1, 1, 1, 1, 0, 1], np.float32)
    weights = np.array([1.0, 2.0, 0.5, 3.0, 1.0], np.float32)
    sums = loss_and_metrics(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), weights=jnp.asarray(weights))
    kept = mask > 0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(logits[kept]), torch.tensor(labels[kept]), pos_weight=torch.tensor(weights), reduction="sum")
    assert float(sums["loss"]) == pytest.approx(float(expected), rel=1e-5)
    exact = np.all((logits > 0) == (labels > 0.5), axis=1)
    assert float(sums["correct"]) == float(exact[kept].sum()) and float(sums["count"]) == 5


def test_the_eval_step_adds_up_the_histograms_of_the_unmasked_examples():
    from jaxtl.core.sharding import make_mesh
    from jaxtl.train.steps import Inputs, make_eval_step

    class Identity:  # the "model" returns its features as logits
        lora_scale = 0.0

        def apply(self, variables, x, train, method):
            return x, None

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(8, 3)).astype(np.float32) * 4
    labels = (rng.random((8, 3)) < 0.5).astype(np.float32)
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    step = make_eval_step(Identity(), 3, make_mesh(), Inputs("features", "x"))
    sums = jax.device_get(step({}, {}, {"features": logits, "labels": labels, "mask": mask}))
    positives, negatives = multilabel.histograms(logits[:6], labels[:6])
    np.testing.assert_array_equal(sums["positives"].reshape(3, -1), positives)
    np.testing.assert_array_equal(sums["negatives"].reshape(3, -1), negatives)


# ---- manifests with several labels -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Images of the three colours of `make_image_folder`, listed with one to three labels each."""
    root = make_image_folder(tmp_path_factory.mktemp("multi") / "data", per_class=8)
    return root, sorted(p.relative_to(root) for p in root.rglob("*.png"))


def test_a_csv_splits_its_labels_at_the_delimiter_and_a_json_line_gives_a_list(colours, tmp_path):
    root, files = colours
    labels = [["red"], ["green", "blue"], ["blue", "red", "green"]] * 8
    (root / "a.csv").write_text("path,label\n" + "".join(f"{f},{';'.join(l)}\n" for f, l in zip(files, labels)))
    (root / "a.jsonl").write_text("".join(json.dumps({"path": str(f), "label": l}) + "\n"
                                          for f, l in zip(files, labels)))
    expected = np.array([[0, 0, 1], [1, 1, 0], [1, 1, 1]] * 8, np.uint8)  # blue, green, red
    for name, delimiter in (("a.csv", ";"), ("a.jsonl", " ")):
        dataset = DataSource(source="manifest", path=str(root / name), multi_label=True, label_delimiter=delimiter,
                             val_fraction=0.25).load()
        assert dataset.multi_label and dataset.class_names == ("blue", "green", "red")
        together = {str(f): row for split in dataset.splits.values() for f, row in zip(split.files, split.labels)}
        assert len(together) == 24 and len(dataset.splits["val"]) == 6  # carved per set of labels (8 each, 1/4)
        for f, row in zip(files, expected):
            np.testing.assert_array_equal(together[str(root / f)], row)


def test_a_hugging_face_column_of_label_lists_gives_the_manifests_labels(colours, tmp_path):
    datasets = pytest.importorskip("datasets")
    root, files = colours
    labels = [["red"], ["green", "blue"], ["blue", "red", "green"]] * 8
    (root / "h.csv").write_text("path,label\n" + "".join(f"{f},{' '.join(l)}\n" for f, l in zip(files, labels)))
    listed = DataSource(source="manifest", path=str(root / "h.csv"), multi_label=True, val_fraction=0.25).load()
    names = ["blue", "green", "red"]
    features = datasets.Features({"image": datasets.Image(),
                                  "labels": datasets.Sequence(datasets.ClassLabel(names=names))})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"image": [{"bytes": (root / f).read_bytes(), "path": None} for f in files],
         "labels": [[names.index(n) for n in row] for row in labels]}, features=features)}).save_to_disk(
        str(tmp_path / "saved"))
    saved = DataSource(source="hf", name=str(tmp_path / "saved"), hf_label_column="labels", multi_label=True,
                       val_fraction=0.25).load()
    assert saved.multi_label and saved.class_names == listed.class_names
    for split in ("train", "val"):
        np.testing.assert_array_equal(saved.splits[split].labels, listed.splits[split].labels)
        assert [saved.splits[split].content_sha256(i) for i in range(3)] == [
            listed.splits[split].content_sha256(i) for i in range(3)]
    with pytest.raises(DataError, match=r"holds one label a row"):
        DataSource(source="hf", name=str(tmp_path / "saved"), hf_label_column="image", multi_label=True).load()


@pytest.mark.parametrize("label, multi, message", [
    ('["red", "blue"]', False, r"line 1 has a list of labels; set data.multi_label=True"),
    ("[]", True, r"line 1 \('.*'\) has an empty label"),
])
def test_a_row_whose_labels_do_not_fit_the_setting_is_named(colours, tmp_path, label, multi, message):
    root, files = colours
    (root / "bad.jsonl").write_text(f'{{"path": "{files[0]}", "label": {label}}}\n')
    with pytest.raises(DataError, match=message):
        DataSource(source="manifest", path=str(root / "bad.jsonl"), multi_label=multi).load()


def test_multi_label_is_refused_where_it_is_not_read_or_not_defined(colours, tmp_path):
    from jaxtl.config import check_values
    from jaxtl.train.run import train_and_evaluate

    root, files = colours
    with pytest.raises(ConfigError, match=r"data.multi_label=True: several labels an image are read from a manifest"):
        check_values(tiny_config(root, **{"data.multi_label": True}))
    (root / "m.csv").write_text("path,label\n" + "".join(f"{f},red green\n" if i % 2 else f"{f},blue\n"
                                                         for i, f in enumerate(files)))
    overrides = {"data.source": "manifest", "data.path": str(root / "m.csv"), "data.multi_label": True}
    with pytest.raises(ConfigError, match=r"data.sampler='balanced' .* multi-label"):
        train_and_evaluate(tiny_config(root, **overrides, **{"data.sampler": "balanced"}), tmp_path / "balanced")


def test_balanced_class_weights_of_multi_hot_rows_weigh_each_labels_positives_as_its_negatives():
    from jaxtl.transfer.recipe import balanced_class_weights

    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0]], np.uint8)
    weights = balanced_class_weights(labels, 3)
    np.testing.assert_allclose(weights, [1 / 3, 1.0, 1.0])  # 3 vs 1, 2 vs 2, none: 1
    positives, negatives = labels.sum(0), len(labels) - labels.sum(0)
    np.testing.assert_allclose((weights * positives)[:2], negatives[:2])


def test_a_multi_label_run_with_mixup_and_class_weights_keeps_its_best_val_map(colours, tmp_path):
    """The epoch loop on multi-hot labels: Mixup mixes the targets, class weights weigh the positives, and the
    kept model is the epoch of the best val mAP (the accuracy recorded beside it is exact match)."""
    from jaxtl.train.run import train_and_evaluate

    root, files = colours
    by_colour = {"red": "red", "green": "green blue", "blue": "blue"}
    (root / "mix.csv").write_text("path,label\n" + "".join(f"{f},{by_colour[f.parent.name]}\n" for f in files))
    overrides = {"data.source": "manifest", "data.path": str(root / "mix.csv"), "data.multi_label": True,
                 "data.augment.mixup": 0.8, "train.class_weights": "balanced", "train.epochs": 3}
    summary = train_and_evaluate(tiny_config(root, **overrides), tmp_path / "mix")
    history = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    best = max(range(len(history)), key=lambda i: history[i]["val_map"])
    assert summary["best_epoch"] == history[best]["epoch"] and summary["best_val_map"] == history[best]["val_map"]
    assert all(np.isfinite(h["train_loss"]) for h in history) and summary["multi_label"]
    assert set(summary["final_val"]) >= {"map", "per_class_ap", "micro_f1", "macro_f1", "thresholds", "pr_curves"}


# ---- a built set on the real EfficientNet-Lite0 ----------------------------------------------------------------

DIGITS = 5  # labels 0 to 4; chance mAP is each label's share of images, 0.4


@pytest.fixture(scope="module")
def signs(data_dir, tmp_path_factory):
    """Two different sign-language digits side by side on a grey square, labelled with both (the run sees them at
    128 px): 100 train, 40 val and 40 test images, each split's photos drawn from its own part of each digit's
    folder; listed in a CSV."""
    from PIL import Image

    root = tmp_path_factory.mktemp("signs")
    rng = np.random.default_rng(0)
    photos = {d: sorted((data_dir / "sign_language_digits" / str(d)).iterdir()) for d in range(DIGITS)}
    parts = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
    rows = ["path,label,split"]
    for split, count in (("train", 100), ("val", 40), ("test", 40)):
        low, high = parts[split]
        for i in range(count):
            pair = rng.choice(DIGITS, 2, replace=False)
            canvas = Image.new("RGB", (200, 200), (128, 128, 128))
            for side, digit in enumerate(pair):
                pool = photos[int(digit)][int(low * len(photos[int(digit)])):int(high * len(photos[int(digit)]))]
                with Image.open(pool[rng.integers(len(pool))]) as photo:
                    canvas.paste(photo.convert("RGB").resize((100, 100)), (100 * side, 50))
            canvas.save(root / f"{split}{i:03d}.jpg", quality=90)
            rows.append(f"{split}{i:03d}.jpg,{' '.join(str(d) for d in sorted(pair))},{split}")
    (root / "signs.csv").write_text("\n".join(rows) + "\n")
    return root


def _signs_run(root, workdir, **overrides):
    from jaxtl.config import apply_overrides, base_config
    from jaxtl.train.run import train_and_evaluate

    settings = {"progress": False, "data.source": "manifest", "data.path": str(root / "signs.csv"),
                "data.multi_label": True, "data.input_size": 128, "train.batch_size": 20, **overrides}
    config = apply_overrides(base_config(), [f"{k}={v!r}" for k, v in settings.items()])
    if config.transfer.strategy == "auto":
        from jaxtl.advice.auto import train_auto

        return train_auto(config, workdir)
    return train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def probe(signs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("probe") / "run"
    return workdir, _signs_run(signs, workdir)


@pytest.mark.slow
def test_the_probe_learns_which_digits_an_image_shows(probe):
    _, summary = probe
    test = summary["best_checkpoint_test"]
    print(f"signs multi-label, linear probe: val mAP {summary['best_val_map']:.3f}, test mAP {summary['test_map']:.3f}"
          f", micro F1 {test['micro_f1']:.3f}")
    assert summary["test_map"] > 0.8 and min(test["per_class_ap"]) > 0.5, test["per_class_ap"]  # chance: 0.4
    assert test["micro_f1"] > 0.7 and len(summary["thresholds"]) == DIGITS
    assert summary["l2_chosen"]["val_map"] == summary["best_val_map"]


@pytest.mark.slow
def test_eval_and_predict_of_a_multi_label_run_use_its_thresholds(probe, signs):
    from jaxtl import commands

    workdir, summary = probe
    evaluated = commands.evaluate(workdir)
    assert evaluated["thresholds"] == summary["thresholds"]
    for key in ("map", "micro_f1", "macro_f1", "accuracy"):
        assert evaluated["test"][key] == pytest.approx(summary["best_checkpoint_test"][key], abs=1e-6), key
    images = [signs / f"test{i:03d}.jpg" for i in range(4)]
    for result in commands.predict(images, workdir=workdir):
        above = {e["label"] for e in result["top"] if e["prob"] >= summary["thresholds"][e["index"]]}
        assert {e["label"] for e in result["labels"]} == above and len(result["top"]) == DIGITS
        assert sum(e["prob"] for e in result["top"]) != pytest.approx(1.0, abs=1e-3)  # sigmoid, not softmax
    refixed = commands.evaluate(workdir, ["eval.threshold=0.5"])
    assert refixed["thresholds"] == [0.5] * DIGITS and refixed["test"]["map"] == evaluated["test"]["map"]


@pytest.mark.slow
def test_an_onnx_export_gives_sigmoid_probabilities_and_the_thresholds(probe, signs, tmp_path):
    pytest.importorskip("onnxruntime")
    from jaxtl import commands
    from jaxtl.serving.onnx_runtime import OnnxModel

    workdir, summary = probe
    commands.export(workdir, "onnx", tmp_path / "signs.onnx")
    exported = OnnxModel(tmp_path / "signs.onnx")
    assert exported.metadata["multi_label"] and exported.metadata["thresholds"] == summary["thresholds"]
    images = [signs / f"test{i:03d}.jpg" for i in range(3)]
    by_onnx = list(commands.predict(images, onnx=tmp_path / "signs.onnx"))
    by_run = list(commands.predict(images, workdir=workdir))
    for a, b in zip(by_onnx, by_run):
        assert [e["label"] for e in a["labels"]] == [e["label"] for e in b["labels"]]
        np.testing.assert_allclose([e["prob"] for e in a["top"]], [e["prob"] for e in b["top"]], atol=1e-4)


@pytest.mark.slow
def test_the_report_draws_precision_and_recall_per_label_and_the_wrongly_labelled_images(probe):
    from jaxtl.report.html import build_report

    workdir, summary = probe
    page = build_report(workdir).read_text()
    assert "Precision and recall per label" in page and "Confusion matrix" not in page
    assert ("Val images with wrong labels" in page or "Every val image gets its labels right" in page)
    assert "for the top label" in page and page.count("data:image/png") >= 1 + 6  # PR picture, 6 Grad-CAMs
    for i, ap in enumerate(summary["best_checkpoint_test"]["per_class_ap"]):
        assert f'data-key="best_checkpoint_test.per_class_ap.{i}" data-value="{ap!r}"' in page


@pytest.mark.slow
def test_finetune_top_learns_which_digits_an_image_shows(signs, tmp_path):
    summary = _signs_run(signs, tmp_path / "top", **{"transfer.strategy": "finetune_top", "train.epochs": 3,
                                                     "optimizer.lr": 0.05})
    print(f"signs multi-label, finetune_top: val mAP {summary['best_val_map']:.3f}, test mAP {summary['test_map']:.3f}")
    assert summary["test_map"] > 0.7, summary["best_checkpoint_test"]["per_class_ap"]  # chance: 0.4
    history = [json.loads(line) for line in (tmp_path / "top" / "metrics.jsonl").read_text().splitlines()]
    assert summary["best_val_map"] == max(h["val_map"] for h in history)


@pytest.mark.slow
def test_auto_ranks_multi_label_candidates_by_val_map_and_counts_images_per_label(signs, tmp_path):
    """`auto` on the pairs: the size counts each image under both its labels, the probes are ranked by val mAP,
    and the run trains the winner, keeping its model by val mAP."""
    summary = _signs_run(signs, tmp_path / "auto", **{"transfer.strategy": "auto"})
    advice = json.loads((tmp_path / "auto" / "advice.json").read_text())
    size = advice["measured"]["size"]
    assert size["train_images"] == 100 and size["median_train_per_class"] == pytest.approx(40, abs=8)  # 200 / 5
    rows = advice["trials"]["rows"]
    assert rows and all("val_map" in row and "val_accuracy" not in row for row in rows)
    winner = next(row for row in rows if row["chosen"])
    assert winner["val_map"] == max(row["val_map"] for row in rows) or "noise" in advice["trials"]["verdict"]
    assert summary["multi_label"] and summary["strategy"] == advice["strategy"]
    assert summary["best_val_map"] == pytest.approx(winner["val_map"], abs=1e-6) and summary["test_map"] > 0.8
    assert "val mAP" in advice["trials"]["verdict"] or "noise" in advice["trials"]["verdict"]


@pytest.mark.slow
def test_advise_reads_a_multi_label_manifest_and_refuses_the_flag_on_a_folder(colours, tmp_path, monkeypatch):
    from tests.helpers import cli, one_line_error

    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "cache"))
    root, files = colours
    by_colour = {"red": "red", "green": "green blue", "blue": "blue"}
    (root / "advise.csv").write_text("path,label\n" + "".join(f"{f},{by_colour[f.parent.name]}\n" for f in files))
    result = cli("advise", "--data", str(root / "advise.csv"), "--multi-label", "--input-size", "64", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    advice = json.loads(result.stdout)
    size = advice["measured"]["size"]
    assert size["train_images"] == 18 and size["train_per_label"] == {"blue": 12, "green": 6, "red": 6}
    assert all(0 <= probe["val_map"] <= 1 for probe in advice["measured"]["layer_probe"])
    assert "probe val mAP" in advice["signals"]["layer_probe"]["says"]
    one_line_error(cli("advise", "--data", str(root), "--multi-label"), "--multi-label", "manifest")
