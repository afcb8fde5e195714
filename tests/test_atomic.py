"""`atomic_path`: a file is replaced whole or not at all, and a failed write is one `WriteError` naming the
folder, even when removing its temporary file fails the same way (a read-only or full disk)."""

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
