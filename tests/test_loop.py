"""Whole runs on a tiny model and dataset: outputs, the resolved config, resume after SIGKILL, gradual phases,
the cached-feature heads, eval and predict from the workdir."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtl.cli import main
from jaxtl.config import load_resolved
from jaxtl.core.errors import ConfigError
from jaxtl.train.restore import evaluate_checkpoint
from jaxtl.train.run import train_and_evaluate
from tests.conftest import REPO, make_image_folder, tiny_config
from tests.helpers import assert_same_run, cli, config_file, interrupted, killed_and_resumed, one_line_error


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("colours"), per_class=12)


@pytest.mark.slow
def test_run_writes_everything_and_learns(colours, tmp_path, capsys):
    config = tiny_config(colours, **{"train.epochs": 3, "data.test_fraction": 0.25})
    summary = train_and_evaluate(config, tmp_path)
    for name in ("summary.json", "config.json", "metrics.jsonl", "learning_curves.png", "confusion_matrix.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert load_resolved(tmp_path).to_dict() == config.to_dict()
    record = json.loads((tmp_path / "plan.json").read_text())  # what the run resolved at its start
    assert (record["strategy"], record["trainer"], record["model"]) == (config.transfer.strategy, "images", "resnet18")
    assert record["phases"] == [{"epochs": 3, "rules": [[".*", 1.0]]}]  # scratch: one phase, everything trains
    assert record["data"]["splits"]["test"]["count"] == 9 and record["data"]["classes"] == ["blue", "green", "red"]
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "best").is_dir()
    assert list((tmp_path / "tensorboard").iterdir())
    written = json.loads((tmp_path / "summary.json").read_text())
    for key in ("best_val_accuracy", "final_val_accuracy", "test_accuracy", "epochs", "steps", "train_seconds",
                "strategy", "model", "weights"):
        assert key in written, key
    assert written["epochs"] == 3 and written["steps"] == 3 * (18 // 8)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    confusion = np.asarray(summary["best_checkpoint_test"]["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == 9
    evaluated = evaluate_checkpoint(tmp_path)
    assert evaluated["val"]["accuracy"] == pytest.approx(summary["best_val_accuracy"])

    images = [colours / "red" / "000.png", colours / "blue" / "000.png"]
    capsys.readouterr()
    main(["predict", "--workdir", str(tmp_path), "--top", "2", "--json", *map(str, images)])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(r["top"]) for r in records] == [2, 2]
    assert {t["label"] for r in records for t in r["top"]} <= {"blue", "green", "red"}


NONFINITE_LAG = 8  # how many steps past a non-finite one the loop may run before it stops

RESUMABLE = {"train.epochs": 4, "train.checkpoint_every_steps": 4, "data.val_fraction": 0.25,
             "optimizer.name": "adamw", "head.dropout": 0.3}  # dropout: the resumed steps must draw the same masks


@pytest.fixture(scope="module")
def straight(colours, tmp_path_factory):
    """An uninterrupted run that the interrupted ones must end exactly like."""
    workdir = tmp_path_factory.mktemp("straight")
    return train_and_evaluate(tiny_config(colours, **RESUMABLE), workdir), workdir


@pytest.mark.slow
def test_run_killed_inside_an_epoch_resumes_to_the_same_result(colours, tmp_path, straight):
    workdir, resumed = killed_and_resumed(tmp_path, colours, RESUMABLE)
    assert "resumed from" in resumed.stderr and "at step 4 of 12 (epoch 2, batch 1 of 3)" in resumed.stderr
    assert_same_run(workdir, *straight)


def test_a_run_paused_after_each_epoch_and_continued_ends_as_the_uninterrupted_run(colours, tmp_path, straight,
                                                                                   caplog):
    """`Plan.pause_after_epochs` (how `auto` trains its candidates rung by rung): the run stops after that epoch,
    saved, and the same plan trained again with a later pause continues it; paused after epoch 1 and after the
    last (trained, not finished), then trained with no pause, it only finishes, and ends as the run that never
    stopped, each epoch once."""
    import dataclasses

    from jaxtl.train.preemption import Paused
    from jaxtl.train.run import check_data, make_plan, prepare_workdir, train

    config, workdir = tiny_config(colours, **RESUMABLE), tmp_path / "rungs"
    workdir.mkdir()
    prepare_workdir(config, workdir)
    for pause in (1, 4):
        plan = dataclasses.replace(check_data(make_plan(config, workdir)), pause_after_epochs=pause)
        with pytest.raises(Paused) as stopped:
            train(plan)
        assert stopped.value.epochs == pause and not (workdir / "summary.json").exists()
        assert [record["epoch"] for record in json.loads("[" + ",".join(
            (workdir / "metrics.jsonl").read_text().splitlines()) + "]")] == list(range(1, pause + 1))
    caplog.set_level("INFO", logger="jaxtl")
    caplog.clear()  # what the rungs logged
    train(check_data(make_plan(config, workdir)))
    assert "at step 12 of 12" in caplog.text and "epoch 4/4" not in caplog.text  # finished, not trained again
    assert_same_run(workdir, *straight)


def test_a_gradual_run_paused_at_a_phase_s_end_continues_into_the_next_phase(colours, tmp_path):
    """A checkpoint at the last step of a phase holds that phase's optimizer state: the run continued from it
    (paused there, as `auto`'s rungs pause, or killed at that epoch's end) carries it over into the next phase as
    the uninterrupted run does, and ends as it did."""
    import dataclasses

    from jaxtl.train.preemption import Paused
    from jaxtl.train.run import check_data, make_plan, prepare_workdir, train

    overrides = RESUMABLE | {"transfer.strategy": "gradual", "transfer.phase_epochs": (1, 2)}
    overrides.pop("train.epochs")
    reference = train_and_evaluate(tiny_config(colours, **overrides), tmp_path / "straight")
    config, workdir = tiny_config(colours, **overrides), tmp_path / "paused"
    workdir.mkdir()
    prepare_workdir(config, workdir)
    with pytest.raises(Paused):
        train(dataclasses.replace(check_data(make_plan(config, workdir)), pause_after_epochs=1))
    train(check_data(make_plan(config, workdir)))
    assert_same_run(workdir, reference, tmp_path / "straight")


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_exits_0_and_resumes_to_the_same_result(colours, tmp_path, straight):
    workdir, command, code, stderr = interrupted(tmp_path, colours, RESUMABLE, signal.SIGTERM)
    assert code == 0 and "preempted (SIGTERM) after step" in stderr and "run the same command again" in stderr
    saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved > 4  # the boundary after the signal, not the last periodic save
    assert cli(*command).returncode == 0
    assert_same_run(workdir, *straight)


@pytest.mark.slow
def test_gradual_runs_its_phases(colours, tmp_path):
    config = tiny_config(colours, **{"transfer.strategy": "gradual", "transfer.phase_epochs": (1, 1, 1)})
    summary = train_and_evaluate(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == [0, 1, 2] and summary["epochs"] == 3


def test_batch_larger_than_data_is_an_error(colours, tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size=64 is larger than the train split"):
        train_and_evaluate(tiny_config(colours, **{"train.batch_size": 64}), tmp_path)


@pytest.mark.slow
def test_a_workdir_resumes_only_its_own_config(colours, tmp_path):
    train_and_evaluate(tiny_config(colours, **{"train.epochs": 1}), tmp_path)
    with pytest.raises(ConfigError, match=r"holds a run with another config \(optimizer.lr: 0.05 -> 0.1\)"):
        train_and_evaluate(tiny_config(colours, **{"train.epochs": 1, "optimizer.lr": 0.1}), tmp_path)


@pytest.mark.slow
def test_bf16_compute_trains(colours, tmp_path):
    """`train.bf16`: the compiled step's convolutions take bfloat16 operands (the float32 step's none), its loss is
    within 2% of the float32 step's on the same batch and weights (bf16 keeps 8 bits of mantissa: about 0.4% a
    rounding, a few roundings deep), parameters stay float32, and the run trains to finite losses."""
    import optax

    from jaxtl.core.sharding import global_batch, make_mesh
    from jaxtl.train import plan as plans
    from jaxtl.train.steps import step_for_rules

    mesh, rng = make_mesh(), np.random.RandomState(0)
    batch = {"images": rng.randn(8, 32, 32, 3).astype(np.float32), "labels": rng.randint(0, 3, 8).astype(np.int32),
             "mask": np.ones(8, np.float32)}
    _, variables = plans.model_plan(tiny_config(colours)).create(3)
    losses, programs = {}, {}
    for bf16 in (False, True):
        model, _ = plans.model_plan(tiny_config(colours, **{"train.bf16": bf16})).create(3)
        step, state = step_for_rules(model, variables, ((".*", 1.0),), optax.constant_schedule(0.01), mesh)
        lowered = step.lower(state, global_batch(batch, mesh))
        programs[bf16] = lowered.as_text()
        state, sums = lowered.compile()(state, global_batch(batch, mesh))
        losses[bf16] = float(sums["loss"]) / float(sums["count"])
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(state.params)} == {np.dtype("float32")}
    convolutions = {bf16: [line for line in text.splitlines() if "stablehlo.convolution" in line]
                    for bf16, text in programs.items()}
    assert convolutions[True] and all("bf16" in line for line in convolutions[True])
    assert convolutions[False] and not any("bf16" in line for line in convolutions[False])
    assert losses[True] == pytest.approx(losses[False], rel=2e-2) and losses[True] != losses[False]

    summary = train_and_evaluate(tiny_config(colours, **{"train.bf16": True, "train.epochs": 1}), tmp_path)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(record["train_loss"]) and summary["final_val"]["loss"] > 0


@pytest.mark.slow
def test_linear_probe_fits_its_head_on_cached_features(colours, tmp_path, caplog, capsys):
    caplog.set_level("INFO", logger="jaxtl")
    config = tiny_config(colours, **{"transfer.strategy": "linear_probe", "data.test_fraction": 0.25,
                                     "features.cache_dir": str(tmp_path / "cache"),
                                     "head.layers": ("stage2", "pre_logits")})
    summary = train_and_evaluate(config, tmp_path / "run")
    assert "feature cache miss" in caplog.text and "augmentation and stochastic depth are off" in caplog.text
    assert summary["feature_cache"]["layers"] == ["stage2", "pre_logits"]
    for name in ("summary.json", "metrics.jsonl", "l2_search.png", "confusion_matrix.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 19 and {"l2", "val_accuracy"} <= set(records[0])
    # The checkpoint is the full model: through the image pipeline it scores what the head scored on the cache.
    evaluated = evaluate_checkpoint(tmp_path / "run")
    assert evaluated["val"]["accuracy"] == pytest.approx(summary["best_val_accuracy"])
    assert evaluated["val"]["loss"] == pytest.approx(summary["final_val"]["loss"], rel=1e-4)
    assert evaluated["test"]["accuracy"] == pytest.approx(summary["test_accuracy"])

    caplog.clear()
    again = train_and_evaluate(config, tmp_path / "again")
    assert "feature cache hit" in caplog.text and "feature cache miss" not in caplog.text
    assert again["best_val_accuracy"] == summary["best_val_accuracy"]
    capsys.readouterr()
    main(["predict", "--workdir", str(tmp_path / "run"), "--json", str(colours / "green" / "000.png")])
    assert json.loads(capsys.readouterr().out)["top"][0]["label"] in ("red", "green", "blue")


@pytest.mark.slow
def test_knn_head_votes_with_the_cached_train_features(colours, tmp_path, capsys):
    config = tiny_config(colours, **{"transfer.strategy": "linear_probe", "head.knn": 3, "data.test_fraction": 0.25,
                                     "features.cache_dir": str(tmp_path / "cache")})
    summary = train_and_evaluate(config, tmp_path / "run")
    assert summary["trainer"] == "features_knn" and summary["trainable_params"] == 0
    assert summary["knn"]["bank"] == summary["splits"]["train"] and summary["optimizer_state_bytes"] == 0
    # The head's vote is the few-shot kNN's (numpy) on the same cached features: same val predictions.
    from jaxtl.features.fewshot import knn_predict
    entries = {split: Path(path) for split, path in summary["feature_cache"]["entries"].items()}
    (train, train_labels), (val, val_labels) = ((np.load(entries[s] / "pre_logits.pooled.npy"),
                                                 np.load(entries[s] / "labels.npy")) for s in ("train", "val"))
    expected = np.mean(knn_predict(train, train_labels, val, 3, 3) == val_labels)
    assert summary["knn"]["val_accuracy"] == pytest.approx(expected)
    assert summary["final_val_accuracy"] == pytest.approx(expected)
    # The bank is a parameter of the kept model: eval and predict through the image pipeline vote the same.
    evaluated = evaluate_checkpoint(tmp_path / "run")
    assert evaluated["val"]["accuracy"] == pytest.approx(expected)
    assert evaluated["test"]["accuracy"] == pytest.approx(summary["test_accuracy"])
    capsys.readouterr()
    main(["predict", "--workdir", str(tmp_path / "run"), "--json", "--top", "3", str(colours / "green" / "000.png")])
    top = json.loads(capsys.readouterr().out)["top"]
    assert sum(t["prob"] for t in top) == pytest.approx(1.0, abs=1e-4)
    # exported, the vote gives predict's probabilities
    from jaxtl.data.preprocess import eval_pixels
    from jaxtl.serving.export import export
    from jaxtl.serving.onnx_runtime import OnnxModel

    export(tmp_path / "run", "onnx", tmp_path / "knn.onnx")
    onnx_model = OnnxModel(tmp_path / "knn.onnx")
    exported = onnx_model.probabilities(eval_pixels(colours / "green" / "000.png", onnx_model.prep)[None])[0]
    np.testing.assert_allclose([exported[onnx_model.classes.index(t["label"])] for t in top],
                               [t["prob"] for t in top], atol=1e-5)
    # the report's Grad-CAM runs the kept model under jit: the vote's bank, restored as NumPy arrays, is indexed
    # by traced neighbours
    report = cli("report", "--workdir", tmp_path / "run")
    assert report.returncode == 0 and "Grad-CAM" in (tmp_path / "run" / "report.html").read_text(), report.stderr
    with pytest.raises(ConfigError, match="head.knn=3 votes with the train split's cached features"):
        train_and_evaluate(tiny_config(colours, **{"transfer.strategy": "finetune_all", "head.knn": 3}),
                           tmp_path / "bad")


@pytest.mark.slow
def test_mlp_head_on_cached_features_trains_in_the_loop(colours, tmp_path):
    config = tiny_config(colours, **{"transfer.strategy": "linear_probe", "head.hidden": 8, "train.epochs": 3,
                                     "optimizer.name": "adamw", "optimizer.lr": 1e-2,
                                     "features.cache_dir": str(tmp_path / "cache")})
    summary = train_and_evaluate(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and (tmp_path / "run" / "learning_curves.png").exists()
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert summary["feature_cache"]["head"] == "MLP (8 hidden units)"
    # the checkpoint is the full model: through the image pipeline it scores what the head scored on features
    evaluated = evaluate_checkpoint(tmp_path / "run")
    assert evaluated["val"]["accuracy"] == pytest.approx(summary["best_val_accuracy"])
    assert summary["best_epoch"] == max(records, key=lambda r: r["val_accuracy"])["epoch"]


@pytest.mark.slow
def test_a_diverging_run_stops_within_steps_naming_the_step_and_cause_and_keeps_finite_checkpoints(colours, tmp_path):
    config = config_file(tmp_path, colours,
                         {"train.epochs": 4, "optimizer.lr": 1e12, "train.checkpoint_every_steps": 1})
    workdir = tmp_path / "run"
    line = one_line_error(cli("train", "--config", config, "--workdir", workdir))
    assert "not finite (NaN or Inf) at step" in line and "optimizer.lr=1e+12" in line and str(workdir) in line
    bad_step = int(line.split("at step ")[1].split()[0])
    assert not (workdir / "summary.json").exists()
    from jaxtl.train.checkpoints import Checkpoints

    checkpoints = Checkpoints(workdir, read_only=True)
    latest = checkpoints.latest_step()
    assert latest is not None and latest <= bad_step + NONFINITE_LAG  # stopped within a few steps
    for manager in (checkpoints.latest, checkpoints.best):
        if manager.latest_step() is not None:
            state, _ = checkpoints.restore(manager)
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state["params"]))
    checkpoints.close()


@pytest.mark.slow
def test_skipping_nonfinite_steps_counts_them_and_finishes(colours, tmp_path, monkeypatch):
    """With `train.skip_nonfinite`, a batch whose loss is NaN changes nothing and is counted: here one training image
    is all NaN, so the step whose batch holds it is skipped, each epoch."""
    from jaxtl.data import pipeline

    real = pipeline.LoadExample.map

    def poisoned(self, element):
        example = real(self, element)
        if self.train and element[1] == 0:  # the batch holding it is stacked as float32, NaN in its place
            example["images"] = np.full(example["images"].shape, np.nan, np.float32)
        return example

    monkeypatch.setattr(pipeline.LoadExample, "map", poisoned)
    config = tiny_config(colours, **{"train.epochs": 4, "train.skip_nonfinite": True})
    summary = train_and_evaluate(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["skipped_steps"] == sum(r["skipped_steps"] for r in records) > 0
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in records)
    json.loads((tmp_path / "run" / "summary.json").read_text())  # valid JSON


@pytest.mark.slow
def test_ctrl_c_saves_says_how_to_resume_and_a_second_stops_at_once(colours, tmp_path, straight):
    workdir, command, code, stderr = interrupted(tmp_path, colours, RESUMABLE, signal.SIGINT)
    assert code == 130 and "interrupted (Ctrl-C) after step" in stderr and "run the same command again" in stderr
    assert "Traceback" not in stderr
    assert cli(*command).returncode == 0
    assert_same_run(workdir, *straight)

    # twice: stop at once, one line, the checkpoints on disk kept
    again = tmp_path / "twice"
    process = subprocess.Popen([sys.executable, str(REPO / "run.py"), *command[:-1], str(again)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (again / "checkpoints" / "4").exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert (again / "checkpoints" / "4").exists()


@pytest.mark.slow
def test_resuming_on_changed_data_is_an_error_unless_asked(tmp_path, caplog):
    caplog.set_level("INFO", logger="jaxtl")
    data = make_image_folder(tmp_path / "data", per_class=12)
    config = tiny_config(data, **{"train.epochs": 1})
    train_and_evaluate(config, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "plan.json").read_text())  # the data's fingerprint is in the record
    assert record["data"]["splits"]["train"]["count"] == 27 and not (tmp_path / "run" / "data.json").exists()
    # a run from before the record held it (its data.json beside): read, and recorded in plan.json on resume
    (tmp_path / "run" / "data.json").write_text(json.dumps(record.pop("data")))
    (tmp_path / "run" / "plan.json").write_text(json.dumps(record))
    train_and_evaluate(config, tmp_path / "run")
    assert "data fingerprint in data.json" in caplog.text and "is recorded in plan.json now" in caplog.text
    assert json.loads((tmp_path / "run" / "plan.json").read_text()) == record | {"data": json.loads(
        (tmp_path / "run" / "data.json").read_text())}
    shutil.copy(data / "red" / "000.png", data / "red" / "999.png")  # one image added
    with pytest.raises(ConfigError, match=r"the data changed since the run in .* started \(train: 27 -> 28 images;"
                                          r".*train.resume_on_changed_data=True"):
        train_and_evaluate(config, tmp_path / "run")
    train_and_evaluate(tiny_config(data, **{"train.epochs": 1, "train.resume_on_changed_data": True}),
                       tmp_path / "run2")


def test_every_json_file_a_run_writes_is_valid_json(colours, tmp_path, monkeypatch):
    """Non-finite numbers (a NaN val loss here) are written as null, never as the bare NaN JSON does not have."""
    from jaxtl.train import loop

    real = loop.evaluate_split
    monkeypatch.setattr(loop, "evaluate_split", lambda *a: real(*a) | {"loss": float("nan")})
    train_and_evaluate(tiny_config(colours, **{"train.epochs": 1}), tmp_path)
    for path in [*tmp_path.glob("*.json"), *tmp_path.glob("*.jsonl")]:
        for line in ([path.read_text()] if path.suffix == ".json" else path.read_text().splitlines()):
            json.loads(line, parse_constant=lambda c: pytest.fail(f"{path}: bare {c}"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["val_loss"] is None


@pytest.mark.slow
def test_summary_counts_trainable_parameters_and_the_optimizers_bytes(colours, tmp_path):
    """SGD with momentum keeps one float32 trace per trainable parameter and nothing for frozen ones: BitFit's
    state is its biases' and the head's, a small fraction of full fine-tuning's."""
    from jaxtl.config import base_config
    from jaxtl.rules import tree_paths
    from jaxtl.train import plan as plans

    counts, classes = {}, 0
    for strategy in ("finetune_all", "bitfit"):
        summary = train_and_evaluate(tiny_config(colours, **{"transfer.strategy": strategy, "train.epochs": 1}),
                                     tmp_path / strategy)
        counts[strategy] = summary["trainable_params"], summary["optimizer_state_bytes"]
        classes = len(summary["classes"])
    model, variables = plans.model_plan(tiny_config(colours)).create(classes)
    paths = jax.tree_util.tree_leaves(tree_paths(variables["params"]))
    sizes = dict(zip(paths, (p.size for p in jax.tree_util.tree_leaves(variables["params"]))))
    assert counts["finetune_all"][0] == sum(sizes.values())
    assert counts["bitfit"][0] == sum(n for p, n in sizes.items() if p.endswith("/bias") or p.startswith("head/"))
    for trainable, nbytes in counts.values():
        assert 4 * trainable <= nbytes <= 4 * trainable + 256  # the traces, and the schedules' step counts
    assert counts["bitfit"][1] < counts["finetune_all"][1] / 20
    assert base_config().optimizer.name == "sgd" and base_config().optimizer.momentum > 0


@pytest.mark.slow
def test_a_bitfit_run_killed_inside_an_epoch_resumes_to_the_same_result(colours, tmp_path):
    """Frozen kernels and scales hold no optimizer state: what a BitFit checkpoint restores (the biases' traces
    and the frozen BatchNorm statistics) must still make the resumed run the uninterrupted one."""
    overrides = {**RESUMABLE, "transfer.strategy": "bitfit"}
    reference = train_and_evaluate(tiny_config(colours, **overrides), tmp_path / "straight")
    workdir, _ = killed_and_resumed(tmp_path, colours, overrides)
    assert_same_run(workdir, reference, tmp_path / "straight")
