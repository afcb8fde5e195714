"""The path layer (`jaxtl.core.locations`): a folder or a manifest at a URL (here fsspec's in-memory file system,
standing for a bucket) reads the same dataset, and trains the same run, as the local folder it was copied from; a
scheme whose package is missing is one error naming the package."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import fsspec
import numpy as np
import pytest

from jaxtl.core import locations
from jaxtl.core.errors import ConfigError, DataError
from jaxtl.data.folder import folder_dataset
from jaxtl.data.sources import DataSource
from tests.conftest import make_image_folder, tiny_config


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A local folder with train and val folders, its copy in `memory://bucket/data`, and a CSV listing beside
    the copy (paths relative to it)."""
    root = make_image_folder(tmp_path_factory.mktemp("local") / "data", per_class=6, splits=("train", "val"),
                             textured=True)
    memory = fsspec.filesystem("memory")
    for path in sorted(root.rglob("*.png")):
        memory.pipe_file(f"/bucket/data/{path.relative_to(root).as_posix()}", path.read_bytes())
    local = folder_dataset(root)
    rows = "".join(f"{path.relative_to(root).as_posix()},{local.class_names[label]},{split}\n"
                   for split, part in local.splits.items() for path, label in zip(part.files, part.labels))
    memory.pipe_file("/bucket/data/images.csv", ("path,label,split\n" + rows).encode())
    yield root, local
    memory.rm("/bucket", recursive=True)


def test_a_folder_and_a_manifest_at_a_url_read_the_local_folders_dataset(bucket):
    root, local = bucket
    for source in (DataSource(path="memory://bucket/data"),
                   DataSource(source="manifest", path="memory://bucket/data/images.csv")):
        remote = source.load()
        assert remote.class_names == local.class_names and set(remote.splits) == set(local.splits)
        for split, part in local.splits.items():
            names = [str(p).split("/bucket/data/", 1)[1] for p in remote.splits[split].files]
            assert names == [p.relative_to(root).as_posix() for p in part.files]
            assert all(locations.is_url(p) for p in remote.splits[split].files)
            np.testing.assert_array_equal(remote.splits[split].labels, part.labels)
            assert remote.splits[split].load(0).tobytes() == part.load(0).tobytes()
    assert source.split_folders() == {"train": "memory://bucket/data/images.csv",
                                      "val": "memory://bucket/data/images.csv"}


@pytest.mark.slow
def test_a_run_on_data_at_a_url_equals_the_run_on_the_local_copy(bucket, tmp_path):
    from jaxtl.train.run import train_and_evaluate

    root, _ = bucket
    runs = {name: train_and_evaluate(tiny_config(path, **{"data.val_fraction": 0.2, "train.epochs": 1}),
                                     tmp_path / name)
            for name, path in (("local", root), ("url", "memory://bucket/data"))}
    for key in ("splits", "classes", "steps", "best_val_accuracy"):
        assert runs["url"][key] == runs["local"][key], key
    assert runs["url"]["final_val"]["loss"] == pytest.approx(runs["local"]["final_val"]["loss"], rel=1e-6)
    recorded = {name: json.loads((tmp_path / name / "plan.json").read_text())["data"] for name in runs}
    assert recorded["url"]["splits"] == recorded["local"]["splits"]  # the same contents, wherever they are


def test_a_listed_file_missing_from_the_bucket_is_named_by_its_row(bucket):
    memory = fsspec.filesystem("memory")
    memory.pipe_file("/bucket/data/bad.csv", b"path,label\ntrain/red/000.png,red\ntrain/red/gone.png,red\n")
    with pytest.raises(DataError, match=r"bad.csv: row 3: 'memory://bucket/data/train/red/gone.png' does not exist"):
        DataSource(source="manifest", path="memory://bucket/data/bad.csv").load()


def test_a_scheme_without_its_package_names_the_package():
    with pytest.raises(ConfigError, match=r"gs://bucket/images: reading gs:// needs gcsfs; pip install gcsfs"):
        DataSource(path="gs://bucket/images").load()


def test_locations_join_and_split_urls_and_paths_alike(tmp_path):
    assert locations.join("gs://b/data/", "train", "x.png") == "gs://b/data/train/x.png"
    assert locations.parent("gs://b/data/list.csv") == "gs://b/data" and locations.name("gs://b/data/x.PNG") == "x.PNG"
    assert locations.location("file:///tmp/x") == locations.location("/tmp/x")
    assert locations.join(tmp_path, "a") == tmp_path / "a" and not locations.is_url(tmp_path)


def test_a_workdir_url_without_its_package_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    from tests.helpers import cli, config_file, one_line_error

    monkeypatch.chdir(tmp_path)
    result = cli("train", "--config", config_file(tmp_path, tmp_path / "data"), "--workdir", "gs://bucket/run")
    one_line_error(result, "gs://bucket/run", "needs gcsfs")
    assert not (tmp_path / "gs:").exists()


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_on_another_machine_as_if_never_stopped_and_reads_back_anywhere(
        tmp_path, monkeypatch):
    """`--workdir memory://...` (standing for a bucket): preempted on one machine after its step 5 (its mirror
    copied up), trained on a second machine from the bucket, the run ends as the uninterrupted run in a local
    folder did; `eval` on a third machine, its mirror empty, reads it back; checkpoints rotated away are deleted
    from the bucket too."""
    from jaxtl.config import load_config
    from jaxtl.train.preemption import PreemptionWatch
    from jaxtl.train.run import train_and_evaluate
    from jaxtl.train.workdir import Mirror
    from tests.helpers import assert_same_run, cli, config_file

    data = make_image_folder(tmp_path / "data", per_class=12, textured=True)  # 3 steps an epoch
    config = config_file(tmp_path, data, {"train.epochs": 4, "train.checkpoint_every_steps": 4,
                                          "data.val_fraction": 0.25, "optimizer.name": "adamw", "head.dropout": 0.3})
    straight = train_and_evaluate(load_config(config), tmp_path / "straight")
    url, memory = "memory://runs/x", fsspec.filesystem("memory")

    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "first"))
    with monkeypatch.context() as patched:
        patched.setattr(PreemptionWatch, "reached", lambda self, step: step >= 5)
        first = cli("train", "--config", config, "--workdir", url)
    assert first.returncode == 0 and "preempted" in first.stderr.lower()
    assert memory.isfile("/runs/x/plan.json") and not memory.exists("/runs/x/summary.json")

    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "second"))
    second = cli("train", "--config", config, "--workdir", url)
    assert second.returncode == 0 and "resumed from" in second.stderr and "at step 5 of 12" in second.stderr
    steps = sorted({int(p.split("/checkpoints/", 1)[1].split("/")[0]) for p in memory.find("/runs/x/checkpoints")})
    assert steps == sorted(int(p.name) for p in (tmp_path / "straight" / "checkpoints").iterdir())  # rotated alike

    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "third"))
    mirror = Mirror(url)
    assert_same_run(mirror.pull(), straight, tmp_path / "straight")
    evaluated = cli("eval", "--workdir", url)
    assert json.loads(evaluated.stdout)["val"]["accuracy"] == pytest.approx(straight["best_val_accuracy"])
    assert memory.isfile("/runs/x/report.html") and not memory.exists("/runs/x/.lock")
    memory.rm("/runs", recursive=True)


def test_a_cache_at_a_url_is_mirrored_here_fetched_where_missing_and_checked(tmp_path, monkeypatch, caplog):
    """A store at a URL: an entry published here is copied to the bucket; a machine with an empty mirror fetches
    its files when asked and checks them like local ones (a damaged object is reported, never used); a copy up that
    fails is a warning and the local entry stays complete."""
    from jaxtl.core.store import Store, mirror_of

    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "here"))
    memory, url, description = fsspec.filesystem("memory"), "memory://cache/features", {"test": "mirror"}
    entry = Store(url).entry(description)
    assert entry.path.parent == mirror_of(url) and mirror_of(url).is_relative_to(tmp_path / "here")
    with entry.writing(["rows.npy"]) as files, open(files["rows.npy"], "wb") as f:
        np.save(f, np.arange(6.0))
    key = entry.path.name
    assert sorted(p.rsplit("/", 1)[1] for p in memory.ls(f"/cache/features/{key}", detail=False)) == [
        "meta.json", "rows.npy", "rows.npy.sha256"]

    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "elsewhere"))  # another machine: nothing mirrored yet
    fetched = Store(url).entry(description)
    assert not fetched.path.exists() and fetched.damage("rows.npy") is None
    np.testing.assert_array_equal(np.load(fetched.file("rows.npy")), np.arange(6.0))
    assert Store(url).entry({"test": "another"}).damage("rows.npy") == "missing"  # in neither place

    flipped = bytearray(memory.cat_file(f"/cache/features/{key}/rows.npy"))
    flipped[-1] ^= 0xFF
    memory.pipe_file(f"/cache/features/{key}/rows.npy", bytes(flipped))
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "third"))
    assert "sha256 mismatch" in Store(url).entry(description).damage("rows.npy")

    def refused(source, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(locations, "upload", refused)
    other = Store(url).entry({"test": "refused"})
    with other.writing(["rows.npy"]) as files, open(files["rows.npy"], "wb") as f:
        np.save(f, np.arange(3.0))
    assert "could not be copied to memory://cache/features/" in caplog.text and other.damage("rows.npy") is None
    memory.rm("/cache", recursive=True)


@pytest.mark.slow
def test_a_probe_run_with_its_feature_cache_in_a_bucket_reuses_it_from_another_machine(tmp_path, monkeypatch,
                                                                                       caplog):
    """`features.cache_dir=memory://...`: the first run extracts and copies the entries up; a run on a machine
    whose mirror is empty reads them from the bucket, extracting nothing, to the same result."""
    from jaxtl.train.run import train_and_evaluate

    caplog.set_level("INFO", logger="jaxtl")
    data = make_image_folder(tmp_path / "data", per_class=6, textured=True)
    config = tiny_config(data, **{"transfer.strategy": "linear_probe", "features.cache_dir": "memory://shared/f"})
    runs = {}
    for machine in ("first", "second"):
        monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / machine))
        caplog.clear()
        runs[machine] = train_and_evaluate(config, tmp_path / f"run-{machine}")
        runs[machine]["log"] = caplog.text
    assert "feature cache miss" in runs["first"]["log"] and "feature cache miss" not in runs["second"]["log"]
    assert runs["second"]["log"].count("feature cache hit") == 2  # train and val, from the bucket
    assert runs["second"]["best_val_accuracy"] == runs["first"]["best_val_accuracy"]
    assert len(fsspec.filesystem("memory").ls("/shared/f")) == 2  # an entry a split
    fsspec.filesystem("memory").rm("/shared", recursive=True)


def test_a_bucket_workdir_for_several_processes_needs_a_scheme_orbax_writes(monkeypatch, tmp_path):
    """A job of several processes writes its checkpoints straight to the bucket with orbax: a scheme orbax cannot
    write (memory://) is refused before anything is claimed or mirrored; gs:// and local:// map to orbax's paths,
    and a trial's folder under a job's mirror to the same folder in the bucket."""
    import jax
    from etils import epath

    from jaxtl.core.errors import WorkdirError
    from jaxtl.train import workdir as workdirs
    from jaxtl.train.checkpoints import checkpoint_root

    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(WorkdirError, match=r"memory://runs/y: a job of several processes writes its checkpoints "
                                           r"straight to the bucket with orbax, which writes gs:// \(not memory://\); "
                                           r"use a gs:// bucket, or a folder every process sees"):
        with workdirs.owned("memory://runs/y"):
            pass
    assert not (tmp_path / "workdirs").exists() and not fsspec.filesystem("memory").exists("/runs/y")
    assert workdirs.orbax_directory("gs://b/runs/x") == epath.Path("gs://b/runs/x")
    assert workdirs.orbax_directory(f"local://{tmp_path}/bucket/x") == tmp_path / "bucket" / "x"
    mirror = tmp_path / "mirror"
    monkeypatch.setitem(workdirs._STRAIGHT, mirror, "gs://b/runs/x")
    assert workdirs.straight_url(mirror / ".trials" / "finetune_top") == "gs://b/runs/x/.trials/finetune_top"
    assert str(checkpoint_root(mirror)) == "gs://b/runs/x" and checkpoint_root(tmp_path / "other") == tmp_path / "other"


def test_a_jobs_trial_checkpoints_in_the_bucket_are_moved_and_removed_there(monkeypatch, tmp_path):
    """`auto` keeps a trial's checkpoints as the run's and starts a killed trial again: for a bucket workdir of
    several processes both happen in the bucket, where orbax wrote them (a `local://` folder here)."""
    from jaxtl.train import workdir as workdirs
    from jaxtl.train.checkpoints import move_checkpoints, remove_run

    bucket, mirror = tmp_path / "bucket", tmp_path / "mirror"
    monkeypatch.setitem(workdirs._STRAIGHT, mirror, f"local://{bucket}")
    for trial, folder in (("kept", "checkpoints"), ("kept", "best"), ("killed", "checkpoints")):
        (bucket / ".trials" / trial / folder / "3").mkdir(parents=True)
        (bucket / ".trials" / trial / folder / "3" / "_CHECKPOINT_METADATA").write_text(trial)
    (mirror / ".trials" / "killed").mkdir(parents=True)  # its record files, here
    move_checkpoints(mirror / ".trials" / "kept", mirror)
    remove_run(mirror / ".trials" / "killed")
    assert (bucket / "checkpoints" / "3" / "_CHECKPOINT_METADATA").read_text() == "kept"
    assert (bucket / "best" / "3" / "_CHECKPOINT_METADATA").is_file()
    assert not list((bucket / ".trials" / "kept").rglob("*")) and not (bucket / ".trials" / "killed").exists()
    assert not (mirror / ".trials" / "killed").exists()


def test_a_bucket_workdir_in_use_by_a_run_on_another_machine_is_refused_and_a_lapsed_claim_taken_over(
        monkeypatch, tmp_path, caplog):
    """`train --workdir gs://...` on a second machine while the first trains there: one line naming the holder,
    before anything is read or written; a claim not written for STALE_SECONDS (its run killed) is taken over with
    a warning, written again at every copy up and removed when the run ends."""
    import time

    from jaxtl.core.errors import WorkdirError
    from jaxtl.train import workdir
    from tests.helpers import cli, config_file

    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path))
    memory = fsspec.filesystem("memory")
    memory.pipe_file("/runs/z/plan.json", b"{}")
    other = {"host": "tpu-vm-7", "pid": 4242, "started": "2026-12-07 09:00:00", "command": "run.py train",
             "token": "0123456789abcdef", "beat": time.time() - 30}
    memory.pipe_file("/runs/z/.lock", json.dumps(other).encode())
    config = config_file(tmp_path, make_image_folder(tmp_path / "data", per_class=4))
    refused = cli("train", "--config", config, "--workdir", "memory://runs/z")  # as users reach it
    assert refused.returncode == 2 and re.search(
        r"memory://runs/z is in use by another run \(host tpu-vm-7, process 4242, since 2026-12-07 09:00:00; its "
        r"claim .* written 3\d s ago\)", refused.stderr), refused.stderr
    with pytest.raises(WorkdirError, match=r"memory://runs/z is in use by another run \(host tpu-vm-7"):
        with workdir.owned("memory://runs/z"):  # and a library caller of the run
            pass
    assert not (tmp_path / "workdirs").exists() and json.loads(memory.cat_file("/runs/z/.lock")) == other

    memory.pipe_file("/runs/z/.lock", json.dumps(other | {"beat": time.time() - workdir.STALE_SECONDS - 1}).encode())
    beats = []
    real_beat = workdir.BucketLock.beat
    monkeypatch.setattr(workdir.BucketLock, "beat", lambda self: (beats.append(time.time()), real_beat(self)))
    monkeypatch.setattr(workdir, "PUSH_SECONDS", 0.05)
    with workdir.owned("memory://runs/z") as local:
        held = json.loads(memory.cat_file("/runs/z/.lock"))
        assert (held["pid"], held["token"] != other["token"]) == (os.getpid(), True)
        assert (local / "plan.json").is_file() and (local / ".lock").is_file()  # the mirror's own lock too
        time.sleep(0.5)
    assert "taking over the claim memory://runs/z/.lock" in caplog.text and len(beats) >= 3  # and at copy ups
    assert not memory.exists("/runs/z/.lock") and memory.isfile("/runs/z/plan.json")

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a claim of this host's, written just now by a process that no longer exists: taken over at once
    memory.pipe_file("/runs/z/.lock", json.dumps(other | {"host": socket.gethostname(), "pid": gone.pid,
                                                          "beat": time.time()}).encode())
    with workdir.owned("memory://runs/z"):
        assert json.loads(memory.cat_file("/runs/z/.lock"))["pid"] == os.getpid()
    # two runs started at one moment: the one whose claim another overwrote before it read it back stops
    monkeypatch.setattr(workdir.BucketLock, "beat", lambda self: (
        real_beat(self), memory.pipe_file("/runs/z/.lock", json.dumps(other | {"beat": time.time()}).encode())))
    with pytest.raises(WorkdirError, match=r"memory://runs/z was claimed by another run starting at the same moment"):
        with workdir.owned("memory://runs/z"):
            pass
    memory.rm("/runs", recursive=True)


def test_a_mirror_fetches_a_file_changed_on_either_side_at_the_same_size_and_keeps_what_did_not_change(
        monkeypatch, tmp_path):
    """A workdir mirror's pull: a file that another machine rewrote in the bucket at the same size, and one changed
    here and never copied up (a run killed between copies), are both the bucket's again; an unchanged one is not
    fetched; what a push copied up is not fetched back."""
    import time

    from jaxtl.train.workdir import Mirror

    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path))
    memory = fsspec.filesystem("memory")
    for name in ("summary.json", "metrics.jsonl", "checkpoints/4/state"):
        memory.pipe_file(f"/runs/m/{name}", b"version 1")
    mirror = Mirror("memory://runs/m")
    local = mirror.pull()
    assert (local / "checkpoints/4/state").read_bytes() == b"version 1"
    time.sleep(0.01)
    memory.pipe_file("/runs/m/summary.json", b"version 2")  # another machine, the same size
    (local / "metrics.jsonl").write_bytes(b"version 3")  # here, never copied up
    fetched = []
    download = locations.download
    monkeypatch.setattr(locations, "download", lambda url, target: (fetched.append(url), download(url, target)))
    Mirror("memory://runs/m").pull()
    assert sorted(fetched) == ["memory://runs/m/metrics.jsonl", "memory://runs/m/summary.json"]
    assert [(local / n).read_bytes() for n in ("summary.json", "metrics.jsonl")] == [b"version 2", b"version 1"]

    mirror = Mirror("memory://runs/m")
    mirror.pull()
    (local / "metrics.jsonl").write_bytes(b"version 4")
    mirror.push()
    fetched.clear()
    Mirror("memory://runs/m").pull()
    assert fetched == [] and memory.cat_file("/runs/m/metrics.jsonl") == b"version 4"
    memory.rm("/runs", recursive=True)
