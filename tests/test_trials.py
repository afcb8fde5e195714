"""`auto`'s trials: the three size tiers, the noise margin and the cheapest-among-ties rule, `advise --trial`,
successive halving (the rungs, the budget's plan, continuation, the top-stage candidates on cached maps) and the
candidates a budget leaves untried (the whole `auto` run end to end:
tests/test_auto.py)."""

import json

import pytest

# the run without report.html, which these tests do not read
from jaxtl.advice.auto import train_auto as train_and_evaluate
from jaxtl.advice.matrix import size_tier
from jaxtl.advice.trials import Cost, choose, noise_margin, plan_rungs, rung_ends, worst_case
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


def test_rungs_halve_the_candidates_and_the_budget_plans_the_worst_case():
    """The rungs' ends double from the first to the run's epochs, one fewer than halving the candidates to one
    takes; the worst case is the dearest surviving every rung; a budget that cannot hold it leaves the dearest out,
    and with nothing else to train the cheapest stays."""
    costs = {"finetune_top_1": Cost(10, 5), "finetune_top_2": Cost(20, 5), "gradual": Cost(20, 5),
             "finetune_all": Cost(100, 10)}
    assert rung_ends(1, 6, 4) == [1, 2, 6] and rung_ends(1, 6, 1) == [6] and rung_ends(3, 3, 4) == [3]
    assert rung_ends(1, 10, 3) == [1, 2, 10] and rung_ends(2, 3, 5) == [2, 3]
    # once 25; epoch 1: all four (150); epoch 2: the dearest two (120); epochs 3-6: the dearest (4 x 100)
    assert worst_case(costs, [1, 2, 6]) == 25 + 150 + 120 + 400
    kept, ends, left_out = plan_rungs(costs, 1, 6, budget=400, keep_one=False)
    assert kept == ["finetune_top_1", "finetune_top_2", "gradual"] and ends == [1, 2, 6]
    assert left_out == {"finetune_all": 10 + 6 * 100}  # what its own run would need
    assert worst_case({name: costs[name] for name in kept}, ends) == 15 + 50 + 40 + 80 <= 400
    assert plan_rungs(costs, 1, 6, budget=10, keep_one=False)[0] == []
    assert plan_rungs(costs, 1, 6, budget=10, keep_one=True)[0] == ["finetune_top_1"]


def test_the_budget_buys_the_model_shortening_the_run_to_the_epochs_it_affords():
    """When the run's epochs do not fit with two candidates, the most epochs that do are planned (the final run
    trains them: the advice's overrides say so, gradual's as its phases), unless one alone affords more than twice
    as many; with nothing fitting, nothing is tried, or (no probe to fall back on) the cheapest runs anyway."""
    from jaxtl.advice.trials import adopt, plan_budget

    def costs_at(epochs):
        return {"finetune_top_1": Cost(30, 10), "finetune_top_2": Cost(50, 10), "finetune_all": Cost(200, 20)}

    epochs, kept, ends, left_out = plan_budget(costs_at, 1, 10, budget=300, keep_one=False)
    # 10 epochs: not even top_1 alone (310 s); 9: it alone (280 s); 5: both, 20 + 80 + 4 x 50 = 300 s
    assert (epochs, kept, ends) == (5, ["finetune_top_1", "finetune_top_2"], [1, 5])
    assert set(left_out) == {"finetune_all"}
    # 120 s: both only for 1 epoch (100 s), top_1 alone for 3 (100 s): more than twice as many, so that
    assert plan_budget(costs_at, 1, 10, budget=120, keep_one=False)[:2] == (3, ["finetune_top_1"])
    assert plan_budget(costs_at, 1, 10, budget=30, keep_one=False)[1] == []
    assert plan_budget(costs_at, 1, 10, budget=30, keep_one=True)[:2] == (10, ["finetune_top_1"])
    advice = {"candidates": [{"name": "gradual", "overrides": ["transfer.strategy=gradual",
                                                               "transfer.phase_epochs=(4, 3, 3)"]},
                             {"name": "finetune_top_2", "overrides": ["transfer.strategy=finetune_top",
                                                                      "transfer.num_stages=2"]}], "reasons": []}
    trials = {"winner": "finetune_top_2", "verdict": "v", "shortened_to": 4, "maps": True}
    assert adopt(advice, trials)["overrides"] == ["transfer.strategy=finetune_top", "transfer.num_stages=2",
                                                  "train.epochs=4", "transfer.cached_maps=True"]
    trials |= {"winner": "gradual", "maps": False}
    assert adopt(advice, trials)["overrides"] == ["transfer.strategy=gradual", "transfer.phase_epochs=(2, 1, 1)"]


def test_successive_halving_continues_the_better_half_and_ends_within_the_budget(monkeypatch, tmp_path):
    """`_halve` on a fake clock (each rung takes its candidate's predicted seconds): the better half by best val
    accuracy go on after each rung, the last trains to the run's last epoch, and everything, the final run's
    epochs included, ends within the budget the plan was made for. When what the rungs took leaves too little for
    the rest, the best alone goes on."""
    import types

    from jaxtl.advice import trials
    from jaxtl.config import base_config

    costs = {"finetune_top_1": Cost(10, 5), "finetune_top_2": Cost(20, 5), "gradual": Cost(20, 5)}
    curves = {"finetune_top_1": [0.70, 0.74, 0.80, 0.81, 0.82, 0.83], "finetune_top_2": [0.72, 0.79, 0.84, 0.86, 0.88,
              0.90], "gradual": [0.60, 0.65, 0.70, 0.72, 0.73, 0.74]}
    clock, slow = [0.0], {"by": 1.0}
    trained = []

    def fake_rung(config, dataset, name, end, mesh, result, metric):
        assert metric == "val_accuracy"  # single-label data: the candidates are ranked by accuracy
        done = len(result["history"])
        seconds = slow["by"] * ((end - done) * costs[name].epoch + (0 if done else costs[name].once))
        clock[0] += seconds
        trained.append((name, done, end))
        result["history"] = curves[name][:end]
        result["seconds"] += seconds
        result["rungs"].append({"epochs": end, "val_accuracy": max(result["history"]), "seconds": seconds})

    monkeypatch.setattr(trials, "_rung", fake_rung)
    monkeypatch.setattr(trials.time, "perf_counter", lambda: clock[0])
    config, dataset = base_config(), types.SimpleNamespace(splits={"train": [0] * 100})
    config.train.epochs = 6
    kept, ends, _ = plan_rungs(costs, 1, 6, budget=200, keep_one=False)
    finalists, results = trials._halve(config, dataset, kept, ends, costs, None, tmp_path, 200, {0: 1.0, 1: 0.3,
                                                                                                 2: 0.5})
    # epoch 1: all three; epoch 2: the better two (0.72, 0.70); epochs 3-6: the better of those (0.79 > 0.74)
    assert trained == [("finetune_top_1", 0, 1), ("finetune_top_2", 0, 1), ("gradual", 0, 1),
                       ("finetune_top_2", 1, 2), ("finetune_top_1", 1, 2), ("finetune_top_2", 2, 6)]
    assert finalists == ["finetune_top_2"] and clock[0] <= 200
    rows = {name: result["row"] for name, result in results.items()}
    assert rows["finetune_top_2"]["val_accuracy"] == 0.90 and "trained to the last epoch" in rows["finetune_top_2"][
        "note"] and [r["epochs"] for r in rows["finetune_top_2"]["rungs"]] == [1, 2, 6]
    assert "stopped after epoch 2" in rows["finetune_top_1"]["note"] and rows["gradual"]["epochs"] == 1
    assert rows["finetune_top_1"]["rising"] and rows["finetune_top_2"]["best_epoch"] == 6

    # the first rungs took three times their prediction: the rest no longer fits, the best alone goes on
    clock[0], slow["by"], trained[:] = 0.0, 3.0, []
    finalists, _ = trials._halve(config, dataset, kept, ends, costs, None, tmp_path / "slow", 200, {0: 1.0, 1: 0.3,
                                                                                                    2: 0.5})
    assert finalists == ["finetune_top_2"] and ("finetune_top_1", 1, 2) not in trained


@pytest.mark.slow
def test_auto_trains_candidates_rung_by_rung_on_cached_maps_and_continues_the_winner(tmp_path, caplog):
    """End to end with the real Lite0: `finetune_top_1` on cached maps of its frozen part and `finetune_all` on
    images train their first epoch; the better goes on to the run's last; the table shows each one's rungs; the
    winner's run is continued into the final run (its epochs trained once), on maps when it trained on them."""
    caplog.set_level("INFO", logger="jaxtl")
    data = make_image_folder(tmp_path / "data", classes=("red", "blue"), per_class=40, textured=True)
    config = lite0_config(data, tmp_path, **{"transfer.strategy": "auto", "data.input_size": 64, "train.epochs": 2,
                                        "transfer.auto_budget_minutes": 5.0,
                                        "transfer.auto_candidates": ("probe_pre_logits", "finetune_top_1",
                                                                     "finetune_all")})
    summary = train_and_evaluate(config, tmp_path / "run")
    advice = json.loads((tmp_path / "run" / "advice.json").read_text())
    trials = advice["trials"]
    rows = {r["name"]: r for r in trials["rows"]}
    top, full = rows["finetune_top_1"], rows["finetune_all"]
    assert trials["rungs"] == [1, 2] and top["images"] == full["images"] == 64  # every training image
    assert "on cached maps" in top["note"] and "x faster than on images" in top["note"]
    assert "cached maps" not in full["note"]
    assert [r["epochs"] for r in top["rungs"]][0] == [r["epochs"] for r in full["rungs"]][0] == 1
    went_on = [name for name in ("finetune_top_1", "finetune_all") if len(rows[name]["rungs"]) == 2]
    assert len(went_on) == 1 and "trained to the last epoch" in rows[went_on[0]]["note"]
    stopped = ({"finetune_top_1", "finetune_all"} - set(went_on)).pop()
    assert rows[went_on[0]]["rungs"][0]["val_accuracy"] >= rows[stopped]["val_accuracy"]
    if trials["winner"] == went_on[0]:  # continued, not trained again: each epoch once, the trial's own
        assert "continued into the run" in rows[went_on[0]]["note"] and caplog.text.count("epoch 2/2") == 1
        assert summary["best_val_accuracy"] == rows[went_on[0]]["val_accuracy"]
        assert ("transfer.cached_maps=True" in advice["overrides"]) == (went_on[0] == "finetune_top_1")
        assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    else:
        assert trials["winner"] == "probe_pre_logits" and summary["strategy"] == "linear_probe"
    assert not list((tmp_path / "run" / ".trials").glob("*"))


@pytest.mark.slow
@pytest.mark.optimized
def test_an_untried_first_candidate_is_named_in_the_verdict(tmp_path, monkeypatch):
    """Medium data (240 training images, 120 a class, against tier bounds lowered five times): the cell's
    first candidate fine-tunes, which a budget of seconds cannot try; the probe that wins says so. Measuring the
    data takes longer than 3 s, so nothing is timed; with 2 minutes and a step timed at a minute (patched: what a
    big model on a slow machine takes), its run does not fit the budget."""
    from jaxtl.advice import matrix, trials

    monkeypatch.setattr(matrix, "MEDIUM_TOTAL", matrix.MEDIUM_TOTAL // 5)
    monkeypatch.setattr(matrix, "MEDIUM_PER_CLASS", matrix.MEDIUM_PER_CLASS // 5)
    data = make_image_folder(tmp_path / "data", classes=("red", "blue"), per_class=150, size=(16, 16))
    timed = []
    monkeypatch.setattr(trials, "_step_seconds", lambda *args, **kwargs: timed.append(args[-1]) or 60.0)
    for budget, note in ((0.05, "untried: measuring the data took"), (2.0, "untried: its run (10 epochs")):
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
