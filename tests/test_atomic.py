"""`atomic_path`: a file is replaced whole or not at all, and a failed write is one `WriteError` naming the
folder, even when removing its temporary file fails the same way (a read-only or full disk); `share`: process 0's
file on every process."""

import errno
import os
from pathlib import Path

import pytest

from jaxtl.core import atomic
from jaxtl.core.atomic import write_json_atomic
from jaxtl.core.errors import WriteError


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"a": 1})

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(WriteError, match=f"cannot write to {tmp_path}: No space left on device"):
        write_json_atomic(target, {"a": 2})
    assert target.read_text().strip() == '{\n  "a": 1\n}' and os.listdir(tmp_path) == ["summary.json"]


def test_a_failed_clean_up_does_not_hide_the_first_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.os, "replace", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)  # removing the temporary file fails too
    with pytest.raises(WriteError, match=f"cannot write to {tmp_path}: Read-only file system"):
        write_json_atomic(tmp_path / "summary.json", {"a": 1})


def test_share_gives_every_process_process_0s_file(monkeypatch, tmp_path):
    """Process 1 of a job (simulated: process 0's bytes as the broadcast returns them) makes its own copy of a file
    process 0 wrote where it has none or another one (a host's own mirror), and removes one process 0 has not."""
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    sent = {}
    monkeypatch.setattr(atomic, "from_main", lambda data: sent["data"])
    path = tmp_path / "run" / "metrics.jsonl"
    for before, process_0 in ((None, b'{"epoch": 1}\n'), (b"stale\n", b'{"epoch": 2}\n'), (b"gone\n", None)):
        if before is not None:
            path.write_bytes(before)
        sent["data"] = process_0
        atomic.share(path)
        assert (path.read_bytes() if path.exists() else None) == process_0
    assert not list(path.parent.glob(".*.tmp"))
