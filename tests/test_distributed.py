"""Multi-process jobs on one machine (loopback, gloo, CPU devices): 2 processes x 2 devices against 1 process x 4
devices (and 2 x 1 against 1 x 2), extraction, a dead process, and a checkpoint restored onto another device layout
from a bucket."""

import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, make_image_folder
from tests.helpers import cli, config_file, cpu_devices_env


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("colours"), per_class=12, textured=True)


@pytest.mark.parametrize("kwargs,match", [
    ({"coordinator": "localhost:1234"}, "missing --num-processes, --process-id"),
    ({"coordinator": "localhost:1234", "num_processes": 2, "process_id": 2}, r"--process-id 2 must be in 0..1"),
])
def test_joining_a_job_needs_all_three_settings(monkeypatch, kwargs, match):
    from jaxtl.core.errors import ConfigError
    from jaxtl.core.processes import initialize

    for name in ("JAXTL_COORDINATOR", "JAXTL_NUM_PROCESSES", "JAXTL_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=match):
        initialize(**kwargs)


@pytest.mark.parametrize("env,cluster", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "SLURM"), ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"), ({"TPU_WORKER_HOSTNAMES": "a,b"}, "Cloud TPU"), ({}, None),
])
def test_cluster_detection(monkeypatch, env, cluster):
    from jaxtl.core.processes import detected_cluster

    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert detected_cluster() == cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The tiny ResNet-18 (width 8, random init) on 32x32 images, 8 a batch: two devices' shares of a batch are the
# same per-device programs in every layout here, so the runs differ only in the order of the gradients' all-reduce.
def _config_file(tmp_path, data, **overrides) -> str:
    return config_file(tmp_path, data, overrides, name="tiny_resnet.py")


def _start(args, processes: int, devices: int, extra_env=None) -> list[subprocess.Popen]:
    """`run.py ARGS` as `processes` processes of `devices` CPU devices each (joined on loopback when > 1)."""
    port = _free_port()
    started = []
    for i in range(processes):
        env = cpu_devices_env(devices, **(extra_env or {}))
        job = ["--coordinator", f"localhost:{port}", "--num-processes", str(processes), "--process-id", str(i)]
        started.append(subprocess.Popen([sys.executable, str(REPO / "run.py"), *args, *(job if processes > 1 else [])],
                                        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return started


def _run(args, processes: int, devices: int, extra_env=None) -> list[str]:
    outputs = []
    for process in _start(args, processes, devices, extra_env):
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        outputs.append(err)
    return outputs


def _train(tmp_path, colours, name, processes, devices, **overrides):
    config = _config_file(tmp_path, colours, **overrides)
    workdir = tmp_path / name
    _run(["train", "--config", config, "--workdir", str(workdir)], processes, devices)
    return workdir, json.loads((workdir / "summary.json").read_text())


# Fine-tunes stage4's convolutions and the head, every BatchNorm kept (its parameters frozen, so it normalises
# with its statistics): batch statistics of 2 images a device would make the comparison a test of float rounding
# in a chaotic reduction, which grows into percents within a few steps; without them the runs agree to 1e-6.
FINETUNE = {"transfer.strategy": "custom", "train.epochs": 4, "optimizer.lr": 0.01,
            "transfer.rules": (("head/.*", 1.0), ("backbone/stage4/.*conv/kernel", 1.0), (".*", 0.0))}


@pytest.fixture(scope="module")
def one_process_finetune(tmp_path_factory, colours):
    """The fine-tuning run as one process of 4 devices: what every other layout must reproduce."""
    return _train(tmp_path_factory.mktemp("reference"), colours, "one", 1, 4, **FINETUNE)


@pytest.mark.parametrize("overrides", [
    FINETUNE,  # through the image pipeline: 2 processes of 2 devices against 1 of 4
    {"transfer.strategy": "linear_probe"},  # the logistic head on cached features: 2 of 1 device against 1 of 2
], ids=["finetune", "cached_linear_probe"])
@pytest.mark.slow
def test_several_processes_give_one_process_of_as_many_devices(tmp_path, colours, overrides, request):
    if overrides["transfer.strategy"] == "linear_probe":  # (one device a process: the probe's checkpoint once failed)
        overrides = overrides | {"features.cache_dir": str(tmp_path / "cache")}
        devices = 2
        one_dir, one = _train(tmp_path, colours, "one", 1, devices, **overrides)
    else:
        devices = 4
        one_dir, one = request.getfixturevalue("one_process_finetune")
    two_dir, two = _train(tmp_path, colours, "two", 2, devices // 2, **overrides)
    assert (one["devices"], two["devices"]) == (devices, devices)
    for key in ("best_val_accuracy", "final_val_accuracy", "steps", "epochs", "best_epoch"):
        assert two[key] == one[key], key
    assert two["final_val"]["loss"] == pytest.approx(one["final_val"]["loss"], rel=1e-6, abs=1e-7)
    # process 0 alone wrote the reports: each metrics line once
    assert (two_dir / "metrics.jsonl").read_text().count("\n") == (one_dir / "metrics.jsonl").read_text().count("\n")
    # the page every process built together (the kept model's restore is collective) and process 0 wrote
    assert "Grad-CAM" in (two_dir / "report.html").read_text() and not list(two_dir.glob(".report.html.*"))


@pytest.mark.slow
def test_two_processes_extract_the_features_of_one(tmp_path, colours):
    """`run.py extract` (the real EfficientNet-Lite0 at 32x32): the same files, each written once."""
    def extract(out, processes, devices):
        _run(["extract", "--model", "efficientnet_lite0", "--data", str(colours), "--layers", "stage2,pre_logits",
              "--input-size", "32", "--batch-size", "8", "--out", str(out)], processes, devices)

    extract(tmp_path / "one", 1, 4)
    extract(tmp_path / "two", 2, 2)
    for name in ("stage2.pooled.npy", "pre_logits.pooled.npy", "labels.npy"):
        np.testing.assert_allclose(np.load(tmp_path / "two" / "all" / name), np.load(tmp_path / "one" / "all" / name),
                                   rtol=1e-6, atol=1e-6)
    assert (tmp_path / "two" / "all" / "files.txt").read_text() == (tmp_path / "one" / "all" / "files.txt").read_text()
    assert not list((tmp_path / "two").rglob(".*.tmp"))  # the other process's copies were dropped, not left


@pytest.mark.slow
def test_a_dead_process_stops_the_others_with_an_error(tmp_path, colours):
    config = _config_file(tmp_path, colours, **FINETUNE | {"train.epochs": 50, "train.checkpoint_every_steps": 1})
    workdir = tmp_path / "run"
    processes = _start(["train", "--config", config, "--workdir", str(workdir)], 2, 2,
                       {"JAXTL_HEARTBEAT_TIMEOUT": "5"})
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "2").exists() and time.time() < deadline:
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    _, err = processes[0].communicate(timeout=120)
    assert processes[0].returncode != 0 and time.time() - killed_at < 60
    assert "another task died" in err or "detected fatal errors" in err, err[-2000:]
    processes[1].communicate()


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_device_layout_from_a_bucket(tmp_path, colours, one_process_finetune,
                                                                     monkeypatch):
    """Saved by 1 process of 4 devices in a bucket workdir (stopped by SIGTERM inside an epoch; its local mirror
    copied up), resumed on another machine (another cache folder) by 2 processes of 1 device, whose checkpoints
    orbax writes straight into the bucket: the run ends as an uninterrupted run does (saved every step, so it
    resumes from where it stopped). A `local://` folder stands in for the bucket: fsspec and orbax both write it."""
    from jaxtl.core.locations import local_mirror

    config = _config_file(tmp_path, colours, **FINETUNE | {"train.checkpoint_every_steps": 1})
    _, reference = one_process_finetune
    bucket = tmp_path / "bucket"
    url = f"local://{bucket}"
    machines = {name: tmp_path / name for name in ("a", "b")}
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(machines["a"]))
    mirror_a = local_mirror(url, "workdirs")
    (process,) = _start(["train", "--config", config, "--workdir", url], 1, 4,
                        {"JAXTL_CACHE_DIR": str(machines["a"])})
    deadline = time.time() + 300
    while not (mirror_a / "checkpoints" / "4").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0 and "preempted" in err and not (bucket / "summary.json").exists()
    saved = sorted(int(p.name) for p in (bucket / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 4 and not (bucket / ".lock").exists()  # copied up as it stopped; claim given up

    _run(["train", "--config", config, "--workdir", url], 2, 1, {"JAXTL_CACHE_DIR": str(machines["b"])})
    moved = json.loads((bucket / "summary.json").read_text())
    assert moved["devices"] == 2
    for key in ("best_val_accuracy", "final_val_accuracy", "steps"):
        assert moved[key] == reference[key], key
    assert moved["final_val"]["loss"] == pytest.approx(reference["final_val"]["loss"], rel=1e-5)
    # orbax wrote the job's checkpoints in the bucket, where the resumed steps follow the copied-up ones
    assert max(int(p.name) for p in (bucket / "checkpoints").iterdir() if p.name.isdigit()) == reference["steps"]
    assert list((bucket / "best").iterdir()) and not (bucket / ".lock").exists()
    # process 0 copied up the record files; each process had its own mirror, with no checkpoints in it
    assert (bucket / "metrics.jsonl").read_text().count("\n") == reference["epochs"]
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(machines["b"]))
    mirrors = [local_mirror(url, "workdirs"), local_mirror(url, "workdirs").with_name(
        local_mirror(url, "workdirs").name + "-process1")]
    assert all(m.is_dir() and not list(m.glob("checkpoints/*")) and not list(m.glob("best/*")) for m in mirrors)
    assert (mirrors[1] / "summary.json").read_bytes() == (bucket / "summary.json").read_bytes()  # shared for the page
    assert (mirrors[0] / "report.html").is_file() and not (mirrors[1] / "report.html").exists()
    # a third machine, one process of one device, evaluates the job's kept model from the bucket
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "c"))
    result = cli("eval", "--workdir", url)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["val"]["accuracy"] == pytest.approx(moved["best_val_accuracy"])


def test_time_based_checkpoints_are_decided_by_process_0_for_all(monkeypatch):
    """Two processes whose clocks disagree (the second runs 7x fast) make the same decisions, step by step: process
    0's, broadcast at agreement points (simulated here: each process's broadcast returns process 0's values)."""
    import jax
    from jax.experimental import multihost_utils

    from jaxtl.train import cadence

    now = {"t": 0.0}
    clocks = [lambda: now["t"], lambda: 7 * now["t"]]
    sent = {}

    def broadcast(values, who):
        if who == 0:
            sent["values"] = values
        return sent["values"]

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    decisions = [[], []]
    saves = [cadence.TimedSaves(0.05, 0, clock=clocks[0]), cadence.TimedSaves(0.05, 0, clock=clocks[1])]
    for step in range(1, 400):
        now["t"] += 0.25 + 0.1 * (step % 3)  # uneven steps, process 0's time
        for who in (0, 1):  # each process in turn; process 0 reaches each step first here, as it may in reality
            monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda v, who=who: broadcast(v, who))
            due = saves[who].due(step)
            decisions[who].append(due)
            if due:
                saves[who].saved()
    interval = 0.05 * 60  # seconds of process 0's clock; saves come at most that often, late by an agreement at most
    assert decisions[0] == decisions[1] and now["t"] / (2 * interval) <= sum(decisions[0]) <= now["t"] / interval + 1
    # a process alone decides by its own clock, at every step
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    alone = cadence.TimedSaves(0.05, 0, clock=clocks[1])
    assert not alone.due(1)
    now["t"] += 4.0 / 7  # 4 s on the fast clock: the 0.05 minutes (3 s) have passed
    assert alone.due(2)


@pytest.mark.slow
def test_two_processes_with_disagreeing_clocks_save_together(tmp_path):
    """A real job: process 1's clock runs 10x fast (its `time` patched at start), checkpoints every 0.2 s by
    process 0's clock; the saves (collectives every process joins) meet, and the run ends."""
    data = make_image_folder(tmp_path / "data", per_class=12)
    config = config_file(tmp_path, data, {"train.epochs": 2, "train.batch_size": 4,
                                          "train.checkpoint_every_minutes": 0.0033})
    fast = tmp_path / "fast_clock"
    fast.mkdir()
    (fast / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('JAXTL_TEST_FAST_CLOCK'):\n"
        "    _real = time.monotonic\n    time.monotonic = lambda: 10 * _real()\n")
    workdir = tmp_path / "run"
    port = _free_port()
    processes = []
    for i in range(2):
        env = cpu_devices_env(1, PYTHONPATH=f"{fast}:{REPO}", **({"JAXTL_TEST_FAST_CLOCK": "1"} if i == 1 else {}))
        processes.append(subprocess.Popen(
            [sys.executable, str(REPO / "run.py"), "train", "--config", str(config), "--workdir", str(workdir),
             "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert "(every 0.0033 minutes)" in errors[0]  # time-based saves happened, at steps both processes agreed on
    assert json.loads((workdir / "summary.json").read_text())["epochs"] == 2
