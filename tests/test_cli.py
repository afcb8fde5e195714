"""`run.py predict` end to end, including real ImageNet accuracy of the packaged EfficientNet-Lite0 weights."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(*args, check=True):
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True, text=True, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def test_predict_json_and_text(data_dir):
    images = sorted((data_dir / "imagenet_sample").glob("n0144*"))[:2]  # tench, goldfish
    lines = _run("predict", "--model", "efficientnet_lite0", "--top", "3", "--json", *map(str, images)).stdout
    records = [json.loads(line) for line in lines.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in images]
    for record, image in zip(records, images):
        assert len(record["top"]) == 3
        assert set(record["top"][0]) == {"index", "wnid", "label", "prob"}
        probs = [t["prob"] for t in record["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert record["top"][0]["wnid"] == image.name.split("_")[0]
    text = _run("predict", "--model", "efficientnet_lite0", "--top", "2", str(images[0])).stdout
    assert text.splitlines()[0] == str(images[0]) and "tench" in text.splitlines()[1]


def test_predict_errors_are_one_line(tmp_path):
    result = _run("predict", "--model", "resnet19", str(tmp_path), check=False)
    assert result.returncode == 2 and "unknown model 'resnet19'" in result.stderr and "Traceback" not in result.stderr
    result = _run("predict", "--model", "resnet18", str(tmp_path / "missing.jpg"), check=False)
    assert result.returncode == 2 and "missing.jpg" in result.stderr


@pytest.mark.slow
def test_efficientnet_lite0_imagenet_sample_accuracy(data_dir):
    """One image per ImageNet class; the file name starts with the true wnid."""
    lines = _run("predict", "--model", "efficientnet_lite0", "--json", str(data_dir / "imagenet_sample")).stdout
    records = [json.loads(line) for line in lines.splitlines()]
    assert len(records) == 1000
    truth = [r["path"].rsplit("/", 1)[-1].split("_")[0] for r in records]
    top1 = sum(r["top"][0]["wnid"] == t for r, t in zip(records, truth)) / len(records)
    top5 = sum(t in [x["wnid"] for x in r["top"]] for r, t in zip(records, truth)) / len(records)
    print(f"efficientnet_lite0 on imagenet_sample: top-1 {top1:.3f}, top-5 {top5:.3f}")
    assert top1 >= 0.85 and top5 >= 0.95


def test_train_strategy_flag_is_checked_before_any_work(tmp_path, capsys):
    from jaxtl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "configs/ants_bees.py", "--workdir", str(tmp_path / "run"), "--strategy", "linear"])
    assert exit_info.value.code == 2
    assert "unknown transfer.strategy 'linear'" in capsys.readouterr().err and not (tmp_path / "run").exists()
