"""`run.py predict` end to end, including real ImageNet accuracy of the packaged EfficientNet-Lite0 weights."""

import json
from pathlib import Path

import pytest
from PIL import Image

from jaxtl.cli import main
from tests.conftest import make_image_folder
from tests.helpers import cli, config_file, one_line_error


def _run(*args, check=True):
    """`run.py ARGS` in this process (`tests.helpers.cli`): what it prints and its exit code."""
    result = cli(*args)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


@pytest.mark.slow
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


@pytest.mark.slow
def test_predict_errors_are_one_line(tmp_path):
    result = _run("predict", "--model", "resnet19", str(tmp_path), check=False)
    assert result.returncode == 2 and "unknown model 'resnet19'" in result.stderr and "Traceback" not in result.stderr
    result = _run("predict", "--model", "resnet18", str(tmp_path / "missing.jpg"), check=False)
    assert result.returncode == 2 and "missing.jpg" in result.stderr


@pytest.mark.slow
@pytest.mark.optimized
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
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "configs/ants_bees.py", "--workdir", str(tmp_path / "run"), "--strategy", "linear"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "transfer.strategy='linear': choose from linear_probe" in err and not (tmp_path / "run").exists()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("flags,named", [
    (["--config.train.batch_size=0"], "train.batch_size=0"),
    (["--config.train.batch_size=-4"], "train.batch_size=-4"),
    (["--config.optimizer.lr=-1.0"], "optimizer.lr=-1.0"),
    (["--config.data.val_fraction=1.5"], "data.val_fraction=1.5"),
    (["--config.data.input_size=7"], "data.input_size=7"),
    (["--config.train.epoch=3"], "train.epoch"),
    (["--config.optimizer.lr=0.1"],
     "optimizer.lr=0.1: set, but transfer.strategy='linear_probe' (a logistic-regression head on cached"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, capsys, flags, named):
    config = "configs/ants_bees.py" if "set, but" in named else "configs/ants_bees.py:finetune_top"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", config, "--workdir", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only jaxtl's own user-facing errors become one-line messages; anything else is a bug and propagates."""
    import jaxtl.commands

    def broken(paths):
        raise KeyError("a bug")

    monkeypatch.setattr(jaxtl.commands, "expand_image_paths", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["predict", "--model", "resnet18", str(tmp_path)])


def test_eval_reads_the_run_s_config_and_needs_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--workdir", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2 and "config.json not found" in capsys.readouterr().err


# ---- Bad inputs, end to end: exit code 2 and a message naming the file or folder, or a warning and a run ----


def _train(tmp_path, data, *flags, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = config_file(tmp_path, data, {"train.epochs": 1, **overrides})
    return main(["train", "--config", config, "--workdir", str(tmp_path / "run"), *flags])


def _exit_2(capsys, call) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name,content", [("truncated.jpg", "half"), ("zero.jpg", b""), ("text.jpg", b"plain text")])
@pytest.mark.slow
def test_unreadable_image_stops_train_naming_it_or_is_skipped(tmp_path, capsys, name, content):
    data = make_image_folder(tmp_path / "data", per_class=8)
    if content == "half":
        Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "whole.jpg")
        content = (tmp_path / "whole.jpg").read_bytes()[:300]
    (data / "red" / name).write_bytes(content)
    err = _exit_2(capsys, lambda: _train(tmp_path, data))
    assert f"red/{name}" in err and "data.skip_bad_images=True" in err and not (tmp_path / "run" / "best").exists()
    _train(tmp_path / "skip", data, "--config.data.skip_bad_images=True")
    assert "skipped 1 unreadable image" in capsys.readouterr().err


@pytest.mark.slow
def test_decompression_bomb_stops_train_and_predict_naming_it(tmp_path, capsys):
    from tests.test_preprocess import bomb_png

    data = make_image_folder(tmp_path / "data", per_class=8)
    bomb_png(data / "red" / "bomb.png")
    err = _exit_2(capsys, lambda: _train(tmp_path, data))
    assert "red/bomb.png' is 40000x40000" in err and "data.max_image_pixels" in err
    err = _exit_2(capsys, lambda: main(["predict", "--model", "efficientnet_lite0", str(data / "red" / "bomb.png")]))
    assert "bomb.png' is 40000x40000" in err
    _train(tmp_path / "skip", data, "--config.data.skip_bad_images=True")
    assert "skipped 1 unreadable image" in capsys.readouterr().err


def test_empty_class_folder_stops_train_naming_it(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=8)
    (data / "violet").mkdir()
    err = _exit_2(capsys, lambda: _train(tmp_path, data))
    assert "class folder" in err and "data/violet' holds no images" in err


def test_broken_symlink_warns_and_the_run_goes_on(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=8)
    (data / "red" / "moved.png").symlink_to(tmp_path / "elsewhere.png")
    _train(tmp_path, data)
    assert "broken symlink" in capsys.readouterr().err and (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_every_format_mode_and_odd_shape_trains_and_predicts(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=6)
    shapes = {"cmyk.jpg": ("CMYK", (40, 30)), "rgba.png": ("RGBA", (40, 30)), "palette.png": ("P", (40, 30)),
              "anim.gif": ("P", (40, 30)), "lossy.webp": ("RGB", (40, 30)), "plain.bmp": ("RGB", (40, 30)),
              "scan.tiff": ("RGB", (40, 30)), "deep16.png": ("I;16", (40, 30)), "one.png": ("RGB", (1, 1)),
              "strip.png": ("RGB", (4000, 3)), "блок_ß.jpg": ("RGB", (40, 30))}
    (data / "grün").mkdir()
    for name, (mode, size) in shapes.items():
        Image.new("RGB", size, (30, 200, 30)).convert(mode).save(data / "grün" / name)
    _train(tmp_path, data, **{"data.val_fraction": 0.0})
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["classes"] == ["blue", "green", "grün", "red"]
    capsys.readouterr()
    main(["predict", "--workdir", str(tmp_path / "run"), "--json", str(data / "grün")])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(Path(r["path"]).name for r in records) == sorted(shapes)


@pytest.mark.parametrize("args,named", [
    (["predict", "--model", "resnet18", "--top", "-1", "x.jpg"], "argument --top: -1: give a whole number >= 1"),
    (["predict", "--model", "resnet18", "--batch-size", "0", "x.jpg"], "argument --batch-size: 0: give a whole"),
    (["fewshot", "--model", "resnet18", "--data", "d", "--input-size", "-5"], "argument --input-size: -5: give"),
    (["fewshot", "--model", "resnet18", "--data", "d", "--knn", "-1"], "argument --knn: -1: give a whole number >= 0"),
    (["fewshot", "--model", "resnet18", "--data", "d", "--seeds", "two"], "argument --seeds: 'two': give a whole"),
    (["advise", "--data", "d", "--budget-minutes", "0"], "argument --budget-minutes: 0: give a number > 0"),
])
def test_command_line_numbers_are_checked_before_any_work(args, named):
    """Every count and size on the command line is checked where it is parsed: one line naming the option, exit 2."""
    one_line_error(cli(*args), named)
