"""Fault injection: every kind of file jaxtl writes, damaged in several ways (truncated, zeroed, random bytes, the
wrong shape), is detected and rebuilt or reported with one line naming it, never silently used; a full disk
during checkpoint and cache writes stops the run with one line, leaves no temporaries, and loses nothing written
before."""

import contextlib
import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest

from jaxtl.core.errors import RunFileError
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.data.decoded import decoded_entry, decoded_split
from jaxtl.data.folder import folder_dataset
from jaxtl.data.manifest import Manifest
from jaxtl.features.cache import cache_entry, cached_features, describe_backbone, feature_file
from jaxtl.models.classifier import init_variables
from jaxtl.train.checkpoints import Checkpoints
from jaxtl.train.restore import evaluate_checkpoint
from jaxtl.train.run import train_and_evaluate
from tests.conftest import TinyResNet, make_image_folder, tiny_config
from tests.helpers import cli, config_file, interrupted, one_line_error, run_cli


# ---- the ways a file gets damaged ----

def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zeroed(path):
    path.write_bytes(bytes(path.stat().st_size))


def random_bytes(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, np.uint8).tobytes())


def flipped(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, min(len(data) // 2 + 32, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def wrong_shape_npy(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros((3, 3), np.float32))


def wrong_shape_json(path):
    path.write_text(json.dumps(["a", "list", "where", "an", "object", "was"]))


DAMAGE = [truncated, zeroed, random_bytes, flipped]


def _largest(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# ---- a finished tiny run, copied for each test ----

@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("colours"), per_class=12)


RUN = {"train.epochs": 3, "train.checkpoint_every_steps": 4, "optimizer.name": "adamw", "data.test_fraction": 0.25}


@pytest.fixture(scope="module")
def finished(colours, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished") / "run"
    return workdir, train_and_evaluate(tiny_config(colours, **RUN), workdir)


@pytest.fixture
def run_copy(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished[0], workdir)
    return workdir


# ---- checkpoints ----

@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_never_used_the_one_before_is(run_copy, damage, caplog):
    caplog.set_level("WARNING", logger="jaxtl")
    newest, before = sorted(int(p.name) for p in (run_copy / "checkpoints").iterdir() if p.name.isdigit())[::-1]
    damage(_largest(run_copy / "checkpoints" / str(newest) / "state"))
    checkpoints = Checkpoints(run_copy, read_only=True)
    state, meta = checkpoints.restore(checkpoints.latest)
    checkpoints.close()
    assert meta["step"] == before and f"checkpoints/{newest} cannot be used" in caplog.text
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in __import__("jax").tree_util.tree_leaves(state["params"]))


@pytest.mark.parametrize("damage", [truncated, flipped, wrong_shape_json])
def test_a_damaged_best_checkpoint_falls_back_to_the_latest_with_the_reason(run_copy, damage, caplog):
    caplog.set_level("WARNING", logger="jaxtl")
    step = next(p for p in (run_copy / "best").iterdir() if p.name.isdigit())
    target = step / "meta" / "metadata" if damage is wrong_shape_json else _largest(step / "state")
    damage(target)
    result = evaluate_checkpoint(run_copy)
    assert "best" in caplog.text and "using the latest checkpoint instead of the best" in caplog.text
    assert 0.0 <= result["val"]["accuracy"] <= 1.0


def test_every_checkpoint_damaged_is_one_line_naming_the_folder(run_copy):
    for step in (run_copy / "checkpoints").iterdir():
        if step.name.isdigit():
            zeroed(_largest(step / "state"))
    with pytest.raises(RunFileError, match=rf"no usable checkpoint in {run_copy / 'checkpoints'}: .*delete the folder"):
        checkpoints = Checkpoints(run_copy, read_only=True)
        checkpoints.restore(checkpoints.latest)


@pytest.mark.slow
def test_a_run_resumed_on_a_damaged_latest_checkpoint_ends_as_an_uninterrupted_run(colours, tmp_path, finished):
    """Killed mid-run, its newest checkpoint then damaged: the rerun resumes from the one before and ends with the
    metrics of the uninterrupted run (batches and dropout depend only on seed, epoch and step)."""
    workdir, command, code, _ = interrupted(tmp_path, colours, RUN, signal.SIGKILL, at_step=6, name="run")
    assert code == -signal.SIGKILL
    newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    random_bytes(_largest(workdir / "checkpoints" / str(newest) / "state"))
    resumed = cli(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoints/{newest} cannot be used" in resumed.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    for key in ("best_val_accuracy", "final_val_accuracy", "steps", "test_accuracy"):
        assert summary[key] == finished[1][key], key
    assert summary["final_val"]["loss"] == pytest.approx(finished[1]["final_val"]["loss"], rel=1e-6)


# ---- the run's own JSON files ----

@pytest.mark.parametrize("damage", [truncated, zeroed, random_bytes, wrong_shape_json])
@pytest.mark.slow
def test_a_damaged_config_json_is_one_line_naming_it(run_copy, damage, tmp_path, colours):
    damage(run_copy / "config.json")
    for command in (["eval", "--workdir", run_copy], ["predict", "--workdir", run_copy, colours / "red" / "000.png"],
                    ["train", "--config", config_file(tmp_path, colours, RUN), "--workdir", run_copy]):
        one_line_error(cli(*command), run_copy / "config.json", "is damaged")


@pytest.mark.parametrize("damage", [truncated, random_bytes])
def test_damaged_metrics_and_data_records_are_rebuilt_on_resume(run_copy, damage, colours, finished, caplog):
    caplog.set_level("WARNING", logger="jaxtl")
    damage(run_copy / "metrics.jsonl")
    record = json.loads((run_copy / "plan.json").read_text())  # as a run from before the record held the data
    (run_copy / "data.json").write_text(json.dumps(record.pop("data")))
    (run_copy / "plan.json").write_text(json.dumps(record))
    damage(run_copy / "data.json")
    assert not (run_copy / "report.html").exists()  # the library's run writes none: `report` makes this one
    report = cli("report", "--workdir", run_copy)  # the readable lines are drawn, the rest named
    assert report.returncode == 0 and (run_copy / "report.html").is_file(), report.stderr[-2000:]
    assert "metrics.jsonl: line" in report.stderr and "damaged, left out of the learning curves" in report.stderr
    summary = train_and_evaluate(tiny_config(colours, **RUN), run_copy)  # finished: evaluates and reports again
    records = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and summary["test_accuracy"] == finished[1]["test_accuracy"]
    assert "data.json is damaged" in caplog.text
    assert json.loads((run_copy / "plan.json").read_text())["data"]["classes"] == ["blue", "green", "red"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncated, zeroed, wrong_shape_json])
def test_a_damaged_summary_json_is_one_line_for_report_and_train_writes_it_again(run_copy, damage, colours, finished):
    damage(run_copy / "summary.json")
    one_line_error(cli("report", "--workdir", run_copy), run_copy / "summary.json", "is damaged", "run it with")
    summary = train_and_evaluate(tiny_config(colours, **RUN), run_copy)  # finished: not trained again
    assert summary["test_accuracy"] == finished[1]["test_accuracy"] and summary["steps"] == finished[1]["steps"]
    assert json.loads((run_copy / "summary.json").read_text())["test_accuracy"] == finished[1]["test_accuracy"]
    assert cli("report", "--workdir", run_copy).returncode == 0


@pytest.mark.parametrize("damage", [truncated, random_bytes, wrong_shape_json])
def test_a_damaged_advice_json_is_measured_again_before_training_and_an_error_after(tmp_path, damage, caplog):
    from jaxtl.advice.auto import read_advice

    caplog.set_level("WARNING", logger="jaxtl")
    path = tmp_path / "advice.json"
    path.write_text(json.dumps({"overrides": ["transfer.strategy='linear_probe'"], "chosen": "probe_pre_logits"}))
    damage(path)
    assert read_advice(path, started=False) is None and f"{path} is damaged" in caplog.text
    with pytest.raises(RunFileError, match=rf"{path} is damaged .*restore it from a copy, or train in a new"):
        read_advice(path, started=True)


# ---- the caches and the manifest ----

PREP = Preprocessing(input_size=32)


@pytest.fixture
def split(tmp_path):
    return folder_dataset(make_image_folder(tmp_path / "images", per_class=4), val_fraction=0.0).splits["train"]


@pytest.mark.parametrize("damage", [*DAMAGE, wrong_shape_npy])
def test_a_damaged_feature_cache_file_is_recomputed_never_used(split, tmp_path, damage, caplog):
    caplog.set_level("INFO", logger="jaxtl")
    model = TinyResNet()
    variables = init_variables(model, __import__("jax").random.key(0))
    entry = cache_entry(describe_backbone("resnet18", None, {"width": 8}, "float32"), PREP, split, tmp_path / "c")
    good, _ = cached_features(entry, model, variables, split, PREP, ("stage4", "pre_logits"))
    good = {k: np.array(v) for k, v in good.items()}
    damage(entry.file(feature_file("stage4", True)))
    caplog.clear()
    again, _ = cached_features(entry, model, variables, split, PREP, ("stage4", "pre_logits"))
    assert "cannot be used" in caplog.text and "feature cache miss: stage4 of" in caplog.text
    np.testing.assert_array_equal(again["stage4"], good["stage4"])
    np.testing.assert_array_equal(again["pre_logits"], good["pre_logits"])  # the sound file kept


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_decoded_pixels_are_decoded_from_the_file_and_the_entry_prepared_again(split, tmp_path, damage,
                                                                                       caplog):
    caplog.set_level("INFO", logger="jaxtl")
    cached = decoded_split(split, PREP, tmp_path / "decoded")
    good = [np.array(cached.pixels(i)) for i in range(len(split))]
    damage(cached.directory / "pixels.bin")
    caplog.clear()
    reopened = decoded_split(split, PREP, tmp_path / "decoded")
    prepared_at_open = "decoded-image cache: " in caplog.text  # a file of the wrong length is caught at open
    pixels = [np.asarray(reopened.pixels(i)) for i in range(len(split))]
    for mine, theirs in zip(pixels, good):
        np.testing.assert_array_equal(mine, theirs)
    if not prepared_at_open:  # same length, other bytes: each image's CRC catches it, and the next run prepares it
        assert "fail their CRC" in caplog.text
        caplog.clear()
        decoded_split(split, PREP, tmp_path / "decoded")
        assert "decoded-image cache: " in caplog.text and "cache hit" not in caplog.text


@pytest.mark.parametrize("damage", [truncated, zeroed, random_bytes, wrong_shape_npy])
def test_a_damaged_decoded_index_is_prepared_again(split, tmp_path, damage, caplog):
    caplog.set_level("INFO", logger="jaxtl")
    cached = decoded_split(split, PREP, tmp_path / "decoded")
    good = np.array(cached.pixels(0))
    damage(decoded_entry(split, PREP, tmp_path / "decoded").file("index.npy"))
    caplog.clear()
    again = decoded_split(split, PREP, tmp_path / "decoded")
    assert "decoded-image cache hit" not in caplog.text
    np.testing.assert_array_equal(np.asarray(again.pixels(0)), good)


@pytest.mark.parametrize("damage", [*DAMAGE, wrong_shape_json])
def test_a_damaged_manifest_is_rebuilt(tmp_path, damage, caplog, monkeypatch):
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "cache"))
    caplog.set_level("WARNING", logger="jaxtl")
    root = make_image_folder(tmp_path / "images", per_class=3)
    first = folder_dataset(root, val_fraction=0.0)
    manifest = Manifest(root)
    damage(manifest.path)
    again = folder_dataset(root, val_fraction=0.0)
    assert "is damaged" in caplog.text or damage is truncated and not Manifest(root).entries == {}
    assert again.splits["train"].files == first.splits["train"].files
    assert Manifest(root).entries  # rebuilt and saved


# ---- a full disk ----

@contextlib.contextmanager
def small_disk(path, size: str):
    """A tmpfs of `size` at `path`: a real full disk (needs the mount privilege, which this project's machines
    and CI have)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.fail(f"cannot mount a tmpfs to fill ({e}); these tests need root, as the project's machines have")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.mark.slow
def test_a_full_disk_during_checkpoint_writes_stops_at_once_and_loses_nothing(colours, tmp_path, finished):
    with small_disk(tmp_path / "disk", "4m") as disk:
        workdir = disk / "run"
        config = config_file(tmp_path, colours, RUN)
        result = run_cli("train", "--config", config, "--workdir", workdir)
        line = one_line_error(result, "No space left on device", "the disk is full")
        assert str(disk) in line
        leftovers = [p for p in disk.rglob("*") if "tmp" in p.name and p.name != "tmp"]
        assert not leftovers, leftovers
        saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        assert saved and not (workdir / "summary.json").exists()
        checkpoints = Checkpoints(workdir, read_only=True)
        _, meta = checkpoints.restore(checkpoints.latest)  # what was written before stays readable
        checkpoints.close()
        assert meta["step"] == saved[-1]
        shutil.copytree(workdir, tmp_path / "bigger")
    resumed = cli("train", "--config", config, "--workdir", tmp_path / "bigger")
    assert resumed.returncode == 0 and f"at step {saved[-1]} of " in resumed.stderr, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "bigger" / "summary.json").read_text())["test_accuracy"] == finished[1]["test_accuracy"]


def test_temporaries_a_late_writer_fills_again_are_removed_too(tmp_path):
    """After a failed save orbax's other writers can still be ending: one that writes into a temporary directory
    after it was removed once (what a full-disk run once left behind) must not leave it there."""
    import threading
    import time

    from jaxtl.train.checkpoints import _remove_temporaries

    inner = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
    inner.mkdir(parents=True)
    (tmp_path / "checkpoints" / "5").mkdir()  # a finished step stays
    writes = threading.Event()

    def late_writer():
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            inner.mkdir(parents=True, exist_ok=True)
            (inner / "d").write_bytes(b"x" * 100)
            writes.set()
            time.sleep(0.01)

    writer = threading.Thread(target=late_writer)
    writer.start()
    writes.wait()
    _remove_temporaries([tmp_path / "checkpoints"], patience=5.0)
    writer.join()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["5"]


@pytest.mark.slow
def test_a_full_disk_during_cache_writes_is_one_line_and_leaves_no_temporaries(colours, tmp_path):
    """The decoded-image cache (written as a stream) and extracted feature maps (memory-mapped: without space
    reserved first, a full disk is a SIGBUS crash)."""
    big = make_image_folder(tmp_path / "big", per_class=12, size=(200, 160))
    with small_disk(tmp_path / "cache", "128k") as cache:
        config = config_file(tmp_path, big, RUN | {"data.decoded_cache": True})
        result = run_cli("train", "--config", config, "--workdir", tmp_path / "run",
                          env={**os.environ, "JAXTL_CACHE_DIR": str(cache)})
        one_line_error(result, str(cache), "No space left on device")
        assert not [p for p in cache.rglob(".*.tmp")]
        out = cache / "features"
        result = run_cli("extract", "--model", "efficientnet_lite0", "--data", big, "--layers", "stem",
                          "--maps", "--input-size", "64", "--out", out)
        one_line_error(result, str(out), "No space left on device")
        assert not [p for p in cache.rglob(".*.tmp")] and not (out / "meta.json").exists()
