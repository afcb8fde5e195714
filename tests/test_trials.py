"""`auto`'s trials: the three size tiers, the noise margin and the cheapest-among-ties rule, `advise --trial`, the
top-stage candidates on cached maps and the candidates a budget leaves untried (the whole `auto` run end to end:
tests/test_auto.py)."""

import json

import pytest

# the run without report.html, which these tests do not read
from jaxtl.advice.auto import train_auto as train_and_evaluate
from jaxtl.advice.matrix import size_tier
from jaxtl.advice.trials import choose, noise_margin
from tests.conftest import make_image_folder
from tests.helpers import lite0_config


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
    # a tied fine-tuning trial still rising at its end: the tie is not broken by cost, the best wins
    rising = [rows[0], rows[1] | {"rising": True}, rows[2]]
    winner, verdict = choose(rising, val_images=100)
    assert winner == "finetune_all" and "finetune_all still rising" in verdict and "the best" in verdict
    # rising but not among the ties: the cheapest of the ties wins as before
    assert choose([rows[0], rows[1], rows[2] | {"rising": True}], val_images=100)[0] == "probe_pre_logits"


@pytest.mark.slow
@pytest.mark.optimized
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
    config = lite0_config(data, tmp_path, **{"transfer.strategy": "auto", "data.input_size": 64, "train.epochs": 2,
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
@pytest.mark.optimized
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
    monkeypatch.setattr(trials, "_step_seconds", lambda *args, **kwargs: timed.append(args[-1]) or 60.0)
    for budget, note in ((0.05, "untried: measuring the data took"), (2.0, "untried: 2 minutes allow")):
        config = lite0_config(data, tmp_path, **{"transfer.strategy": "auto", "data.input_size": 32,
                                            "transfer.auto_budget_minutes": budget})
        summary = train_and_evaluate(config, tmp_path / f"run_{budget}")
        advice = json.loads((tmp_path / f"run_{budget}" / "advice.json").read_text())
        first = advice["candidates"][0]["name"]
        assert advice["size"] == "medium" and first.startswith("finetune")
        assert next(r for r in advice["trials"]["rows"] if r["name"] == first)["note"].startswith(note)
        assert f"the cell's first candidate, {first}, was not tried" in advice["trials"]["verdict"]
        assert summary["strategy"] == "linear_probe"
        assert bool(timed) == (budget == 2.0)  # timed only when the budget had time left
