"""`auto` by measurement: the three size tiers, the noise margin and the cheapest-among-ties rule, and real trials
on generated data where fine-tuning must win and where it must not."""

import json

import pytest

from jaxtl.advice.matrix import size_tier
from jaxtl.advice.trials import choose, noise_margin
from jaxtl.commands import train as train_and_evaluate
from jaxtl.config import apply_overrides, base_config
from jaxtl.train.restore import evaluate_checkpoint
from tests.conftest import make_dark_shapes_folder, make_glyph_folder, make_image_folder


@pytest.mark.parametrize("images,classes,tier", [
    (245, 2, "small"), (999, 2, "small"), (1651, 10, "medium"), (3068, 10, "medium"), (5000, 100, "small"),
    (12_000, 10, "large"), (12_000, 100, "medium"),
])
def test_size_tiers_count_in_all_and_per_class(images, classes, tier):
    size = {"train_images": images, "classes": classes, "median_train_per_class": images / classes}
    assert size_tier(size)[0] == tier


def test_noise_ties_go_to_the_cheapest():
    rows = [{"name": "probe_pre_logits", "val_accuracy": 0.90}, {"name": "finetune_all", "val_accuracy": 0.92},
            {"name": "finetune_top_1", "val_accuracy": 0.80}]
    winner, verdict = choose(rows, val_images=100)  # one standard error at 0.92 on 100 images: 0.027
    assert winner == "probe_pre_logits" and "within the noise" in verdict and "cheapest" in verdict
    winner, verdict = choose(rows, val_images=10_000)  # 0.0027: finetune_all is clearly better
    assert winner == "finetune_all" and "wins" in verdict
    assert noise_margin(1.0, 50) == pytest.approx(1 / 50)  # never below one image


def _config(data, tmp_path, **overrides):
    values = {"progress": False, "data.path": str(data), "data.input_size": 64, "train.batch_size": 16,
              "optimizer.name": "adamw", "optimizer.lr": 1e-3, "data.augment.flip": False,
              "data.augment.crop_scale": (0.8, 1.0), "features.cache_dir": str(tmp_path / "cache")} | overrides
    return apply_overrides(base_config(), [f"{k}={v!r}" for k, v in values.items()])


@pytest.mark.slow
def test_auto_picks_fine_tuning_where_it_clearly_beats_every_probe_and_keeps_its_trial(tmp_path, caplog):
    """End to end: fine-tuning beats both probes by more than the noise; its trial used every training image for
    the run's epochs, so it was the run itself: the run continues from it instead of training it again."""
    caplog.set_level("INFO", logger="jaxtl")
    data = make_glyph_folder(tmp_path / "glyphs", size=48)
    config = _config(data, tmp_path, **{"transfer.strategy": "auto", "train.epochs": 10, "data.input_size": 48,
                                        "transfer.auto_candidates": ("probe_pre_logits", "probe_earlier",
                                                                     "finetune_all"),
                                        "transfer.auto_trial_epochs": 10, "transfer.auto_budget_minutes": 15.0})
    summary = train_and_evaluate(config, tmp_path / "run")
    trials = json.loads((tmp_path / "run" / "advice.json").read_text())["trials"]
    scores = {row["name"]: row["val_accuracy"] for row in trials["rows"]}
    assert trials["winner"] == "finetune_all", trials
    assert scores["finetune_all"] - max(scores["probe_pre_logits"], scores["probe_earlier"]) > noise_margin(
        scores["finetune_all"], trials["val_images"])
    assert scores["probe_pre_logits"] < 0.65  # mirror-blind pooled features
    assert summary["strategy"] == "finetune_all" and summary["best_val_accuracy"] == scores["finetune_all"]
    assert "was this run" in caplog.text and caplog.text.count("epoch 10/10") == 1  # trained once, not twice
    assert summary["epochs"] == 10 and len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 10
    assert (tmp_path / "run" / "best").is_dir() and not list((tmp_path / "run" / ".trials").glob("*"))


@pytest.mark.slow
def test_auto_keeps_the_probe_where_fine_tuning_does_not_beat_it(tmp_path):
    """End to end: `train --strategy auto` tries a fine-tuning candidate, which loses, and trains the probe."""
    data = make_dark_shapes_folder(tmp_path / "shapes", per_class=100)
    config = _config(data, tmp_path, **{"transfer.strategy": "auto", "transfer.auto_budget_minutes": 4.0,
                                        "transfer.auto_candidates": ("probe_pre_logits", "finetune_all")})
    summary = train_and_evaluate(config, tmp_path / "run")
    advice = json.loads((tmp_path / "run" / "advice.json").read_text())
    scores = {row["name"]: row["val_accuracy"] for row in advice["trials"]["rows"]}
    assert advice["chosen"] == "probe_pre_logits" and scores["finetune_all"] is not None
    assert scores["probe_pre_logits"] > scores["finetune_all"]
    assert summary["strategy"] == "linear_probe" and summary["auto"]["chosen"] == "probe_pre_logits"
    assert summary["best_val_accuracy"] == pytest.approx(scores["probe_pre_logits"])  # the trial's fit is the run's


@pytest.mark.slow
def test_a_folder_with_only_train_and_test_runs_auto_and_reports_test(tmp_path, caplog):
    caplog.set_level("INFO", logger="jaxtl")
    data = make_image_folder(tmp_path / "data", classes=("red", "blue"), per_class=12, splits=("train", "test"))
    config = _config(data, tmp_path, **{"transfer.strategy": "auto", "data.input_size": 32})
    summary = train_and_evaluate(config, tmp_path / "run")
    assert summary["splits"] == {"train": 20, "val": 4, "test": 24}  # val carved from train, test kept apart
    assert "val carved from train" in caplog.text and summary["test_accuracy"] is not None
    assert summary["auto"]["size"] == "small" and summary["strategy"] == "linear_probe"
    rows = json.loads((tmp_path / "run" / "advice.json").read_text())["trials"]["rows"]
    assert {row["name"] for row in rows} == {"probe_pre_logits", "probe_earlier"}  # small data: probes only
    # the finished auto run evaluates with its own config, keys its final strategy does not read and all
    evaluated = evaluate_checkpoint(tmp_path / "run")
    assert evaluated["test"]["accuracy"] == pytest.approx(summary["test_accuracy"])


@pytest.mark.slow
def test_advise_trial_scores_the_candidates_and_trains_nothing(tmp_path, capsys, monkeypatch):
    from jaxtl.cli import main

    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", classes=("red", "blue"), per_class=12)
    main(["advise", "--data", str(data), "--input-size", "32", "--trial", "--json"])
    advice = json.loads(capsys.readouterr().out)
    rows = advice["trials"]["rows"]
    assert {row["name"] for row in rows} == {"probe_pre_logits", "probe_earlier"}  # small data: probes only
    assert advice["chosen"] == advice["trials"]["winner"] and "run_dir" not in advice["trials"]
    assert all(0.0 <= row["val_accuracy"] <= 1.0 for row in rows)
    assert not list((tmp_path / "cache").glob("trials/*/.trials/*"))  # nothing trained, nothing left


@pytest.mark.slow
def test_top_stage_trials_train_on_cached_maps_and_afford_more_images(tmp_path, caplog):
    """With one budget, `finetune_top_1` on cached maps of the frozen part sees at least as many images as full
    fine-tuning on images, and its row says where it trained and how much faster its step was."""
    caplog.set_level("INFO", logger="jaxtl")
    data = make_image_folder(tmp_path / "data", classes=("red", "blue"), per_class=40, textured=True)
    config = _config(data, tmp_path, **{"transfer.strategy": "auto", "data.input_size": 64, "train.epochs": 2,
                                        "transfer.auto_trial_epochs": 2, "transfer.auto_budget_minutes": 3.0,
                                        "transfer.auto_candidates": ("probe_pre_logits", "finetune_top_1",
                                                                     "finetune_all")})
    train_and_evaluate(config, tmp_path / "run")
    rows = {r["name"]: r for r in json.loads((tmp_path / "run" / "advice.json").read_text())["trials"]["rows"]}
    top, full = rows["finetune_top_1"], rows["finetune_all"]
    assert top["val_accuracy"] is not None and "cached stage3 maps" in top["note"]
    assert top["speedup"] > 1 and f"{top['speedup']:g}x faster" in top["note"]
    # on the same budget, as many images or more (all of them here; full fine-tuning's may be none: untried)
    assert top["images"] == 64 and top["images"] >= full["images"]
    assert (full["val_accuracy"] is None) == full["note"].startswith("untried")
    assert "cached maps" not in full["note"]


@pytest.mark.slow
def test_an_untried_first_candidate_is_named_in_the_verdict(tmp_path, monkeypatch):
    """Medium data (240 training images, 120 a class, against tier bounds lowered five times): the cell's
    first candidate fine-tunes, which a budget of seconds cannot try; the probe that wins says so. Measuring the
    data takes longer than 3 s, so nothing is timed; with 2 minutes and a step timed at a minute (patched: what a
    big model on a slow machine takes), the budget allows too few images a class."""
    from jaxtl.advice import matrix, trials

    monkeypatch.setattr(matrix, "MEDIUM_TOTAL", matrix.MEDIUM_TOTAL // 5)
    monkeypatch.setattr(matrix, "MEDIUM_PER_CLASS", matrix.MEDIUM_PER_CLASS // 5)
    data = make_image_folder(tmp_path / "data", classes=("red", "blue"), per_class=150, size=(16, 16))
    timed = []
    monkeypatch.setattr(trials, "_step_seconds", lambda *args: timed.append(args[-1]) or 60.0)
    for budget, note in ((0.05, "untried: measuring the data took"), (2.0, "untried: 2 minutes allow")):
        config = _config(data, tmp_path, **{"transfer.strategy": "auto", "data.input_size": 32,
                                            "transfer.auto_budget_minutes": budget})
        summary = train_and_evaluate(config, tmp_path / f"run_{budget}")
        advice = json.loads((tmp_path / f"run_{budget}" / "advice.json").read_text())
        first = advice["candidates"][0]["name"]
        assert advice["size"] == "medium" and first.startswith("finetune")
        assert next(r for r in advice["trials"]["rows"] if r["name"] == first)["note"].startswith(note)
        assert f"the cell's first candidate, {first}, was not tried" in advice["trials"]["verdict"]
        assert summary["strategy"] == "linear_probe"
        assert bool(timed) == (budget == 2.0)  # timed only when the budget had time left
