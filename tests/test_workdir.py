"""A workdir belongs to one run: a second `train` on it stops at once naming the holder, a lock left by a killed
run is taken over, and workdirs that cannot be one (a file, under a file, read-only) are one line each."""

import json
import os
import subprocess
import sys
import time

import pytest

from jaxtl.core.errors import WorkdirError
from jaxtl.train.workdir import LOCK, WorkdirLock, owned, usable
from tests.conftest import REPO, make_image_folder
from tests.helpers import config_file


@pytest.mark.slow
def test_a_second_train_on_a_workdir_in_use_stops_at_once_naming_the_holder(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=12)
    config = config_file(tmp_path, data, {"train.epochs": 3})
    workdir = tmp_path / "run"
    command = [sys.executable, str(REPO / "run.py"), "train", "--config", config, "--workdir", str(workdir)]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (workdir / LOCK).exists() and first.poll() is None:
        time.sleep(0.01)
    started = time.time()
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 2 and time.time() - started < 60, second.stderr[-2000:]
    line = second.stderr.strip().splitlines()[-1]
    assert f"--workdir {workdir} is in use by another run" in line and f"process {first.pid}" in line, line
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]  # each epoch once: the second run wrote nothing
    assert not (workdir / LOCK).exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    caplog.set_level("WARNING", logger="jaxtl")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout),
                                             "started": "earlier"}))
    with owned(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "taking over the workdir lock" in caplog.text and not (tmp_path / LOCK).exists()
    # from another host: stale once its heartbeat is old
    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "earlier"}))
    with pytest.raises(WorkdirError, match="in use by another run \\(host elsewhere, process 1"):
        WorkdirLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK, (old, old))
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    lock.release()


def test_workdirs_that_cannot_be_one_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match=r"--workdir .*/file is a file, not a directory"):
        usable(tmp_path / "file")
    with pytest.raises(WorkdirError, match=r"--workdir .*/file/run lies under .*/file, which is a file"):
        usable(tmp_path / "file" / "run")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(readonly)]).returncode:
        pytest.fail("cannot mount a read-only tmpfs (needs root, as the project's machines have)")
    try:
        with pytest.raises(WorkdirError, match=r"cannot create --workdir .*/ro/run: Read-only file system"):
            with owned(readonly / "run"):
                pass
        with pytest.raises(WorkdirError, match=r"--workdir .*/ro is not writable"):
            with owned(readonly):
                pass
    finally:
        subprocess.run(["umount", "-l", str(readonly)])


@pytest.mark.parametrize("kind", ["file", "under_file"])
def test_the_cli_says_so_in_one_line(tmp_path, kind):
    (tmp_path / "file").write_text("x")
    workdir = tmp_path / "file" if kind == "file" else tmp_path / "file" / "run"
    data = make_image_folder(tmp_path / "data", per_class=4)
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "train", "--config",
                             config_file(tmp_path, data, {}), "--workdir", str(workdir)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert str(workdir) in result.stderr
