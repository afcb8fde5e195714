"""`train --strategy auto` end to end with the real EfficientNet-Lite0: on generated data where fine-tuning must
win (and its trial is kept as the run) and where it must not, and on a folder with train and test only."""

import json

import pytest

# the run without report.html, which these tests do not read
from jaxtl.advice.auto import train_auto as train_and_evaluate
from jaxtl.advice.trials import noise_margin
from jaxtl.train import plan as plans
from jaxtl.train.loop import PhaseSteps
from jaxtl.train.restore import evaluate_checkpoint
from tests.conftest import make_dark_shapes_folder, make_glyph_folder, make_image_folder
from tests.helpers import lite0_config, weight_reads


@pytest.mark.slow
@pytest.mark.optimized
def test_auto_picks_fine_tuning_where_it_clearly_beats_every_probe_and_keeps_its_trial(tmp_path, caplog,
                                                                                        monkeypatch):
    """End to end: fine-tuning beats both probes by more than the noise; its trial used every training image for
    the run's epochs, so it was the run itself: the run continues from it instead of training it again. The step
    timed for the budget is the trial's own program (what the compilation cache then serves)."""
    caplog.set_level("INFO", logger="jaxtl")
    programs = []  # the program of each train step built, at its first call
    build = PhaseSteps.train_step

    def recorded(self, index, tx):
        step, called = build(self, index, tx), []

        def first_call(state, batch):
            if not called:
                called.append(True)
                programs.append(step.lower(state, batch).as_text())
            return step(state, batch)

        return first_call

    monkeypatch.setattr(PhaseSteps, "train_step", recorded)
    records = []  # the run's record: the trial's, kept, not written again
    monkeypatch.setattr(plans, "write_record", lambda plan, write=plans.write_record: (
        records.append((plan.workdir.name, (plan.workdir / plans.RECORD_FILE).is_file())), write(plan))[1])
    data = make_glyph_folder(tmp_path / "glyphs", size=48)
    config = lite0_config(data, tmp_path, **{"transfer.strategy": "auto", "train.epochs": 10, "data.input_size": 48,
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
    assert len(programs) == 2 and programs[0] == programs[1]  # the timing's step, then the trial's: one program
    assert records == [("finetune_all", False), ("run", True)]  # written by the trial, read by the run
    assert json.loads((tmp_path / "run" / plans.RECORD_FILE).read_text())["strategy"] == "finetune_all"


@pytest.mark.slow
@pytest.mark.optimized
def test_auto_keeps_the_probe_where_fine_tuning_does_not_beat_it(tmp_path, monkeypatch):
    """End to end: `train --strategy auto` tries a fine-tuning candidate, which loses, and trains the probe; the
    weights file is read once for its measurements, the step it times, the trial and the final run."""
    reads = weight_reads(monkeypatch)
    data = make_dark_shapes_folder(tmp_path / "shapes", per_class=100)
    config = lite0_config(data, tmp_path, **{"transfer.strategy": "auto", "transfer.auto_budget_minutes": 4.0,
                                        "train.epochs": 3,
                                        "transfer.auto_candidates": ("probe_pre_logits", "finetune_all")})
    summary = train_and_evaluate(config, tmp_path / "run")
    assert len(reads) == 1, reads
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
    config = lite0_config(data, tmp_path, **{"transfer.strategy": "auto", "data.input_size": 32})
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
@pytest.mark.optimized
def test_auto_models_ranks_a_pretrained_backbone_above_a_random_one_and_trains_it(data_dir, tmp_path, caplog):
    """`transfer.auto_models` on the shared ants and bees: MobileNetV2 with its packaged ImageNet weights against
    EfficientNet-Lite0 randomly initialised (listed first, so a tie would keep it): the pretrained one's kNN val
    accuracy is far higher, the strategy is chosen and trained on it, and the advice says why."""
    caplog.set_level("INFO", logger="jaxtl")
    config = lite0_config(data_dir / "hymenoptera_data", tmp_path, **{
        "transfer.strategy": "auto", "transfer.auto_budget_minutes": 0.0, "data.input_size": 96,
        "transfer.auto_models": ("efficientnet_lite0=none", "mobilenet_v2")})
    summary = train_and_evaluate(config, tmp_path / "run")
    advice = json.loads((tmp_path / "run" / "advice.json").read_text())
    models = advice["models"]
    scores = {row["model"]: row["knn_val_accuracy"] for row in models["rows"]}
    assert [row["model"] for row in models["rows"]] == ["mobilenet_v2", "efficientnet_lite0"]  # best first
    assert scores["mobilenet_v2"] > 0.8 and scores["mobilenet_v2"] - scores["efficientnet_lite0"] > 0.15, scores
    assert models["rows"][1]["weights"] is None and models["rows"][0]["input_size"] == 96
    assert "mobilenet_v2" in models["why"] and "against" in models["why"]
    assert advice["overrides"][:2] == ["model.name='mobilenet_v2'", "model.weights='default'"]
    assert advice["measured"]["model"] == "mobilenet_v2"  # the advice measured the chosen backbone
    assert summary["model"] == "mobilenet_v2" and summary["best_val_accuracy"] > 0.8
    assert summary["auto"]["models"]["chosen"] == "mobilenet_v2"
    assert json.loads((tmp_path / "run" / plans.RECORD_FILE).read_text())["model"] == "mobilenet_v2"
    assert "backbones, by the 10-nearest-neighbour accuracy" in caplog.text


def test_auto_models_names_an_unknown_or_repeated_backbone():
    from jaxtl.advice.models import parse_models
    from jaxtl.core.errors import ConfigError

    assert parse_models(["mobilenet_v2", "efficientnet_lite0=none", "resnet50=weights.pth"]) == [
        ("mobilenet_v2", "default"), ("efficientnet_lite0", None), ("resnet50", "weights.pth")]
    with pytest.raises(ConfigError, match=r"transfer.auto_models: 'mobilenet_v3' is not a registered model"):
        parse_models(["mobilenet_v3"])
    with pytest.raises(ConfigError, match="names a backbone twice"):
        parse_models(["mobilenet_v2", "mobilenet_v2=default"])
