"""A run's workdir: checked to be a directory this process can write, and locked by the run that owns it, so two
`train` commands started on one workdir by mistake cannot both write it.

The lock is `WORKDIR/.lock` (JSON: host, process id, start time, command), created exclusively by process 0 of the
job and removed when the run ends. A second run finds it and stops at once, naming the holder. A lock left by a
run that was killed is stale and taken over, with a warning: on the same host, when its process no longer exists;
from another host, when its heartbeat (the file's modification time, touched every `HEARTBEAT_SECONDS` by the
holder) is older than `STALE_SECONDS`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from jaxtl.core.atomic import write_error
from jaxtl.core.errors import WorkdirError
from jaxtl.core.processes import any_process, is_main

log = logging.getLogger(__name__)

LOCK = ".lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0


def usable(workdir: Path) -> Path:
    """`workdir`, created if missing; an error naming the path and what to do when it cannot be a workdir."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory; choose another path")
    parent = next((p for p in workdir.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise WorkdirError(f"--workdir {workdir} lies under {parent}, which is a file; choose another path")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create --workdir {workdir}: {e.strerror}; choose a directory you can write "
                           "to") from e
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir {workdir} is not writable (read-only or no permission); choose a directory "
                           "you can write to")
    return workdir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class WorkdirLock:
    """Process 0's claim on a workdir (see the module docstring)."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join(sys.argv)[:300]}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # removed meanwhile, or half-written by a killed run

    def _stale(self, holder: dict | None) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if holder is None:
            return age > HEARTBEAT_SECONDS  # unreadable and not being written
        if holder.get("host") == self.me["host"]:
            return not _alive(int(holder.get("pid", -1)))
        return age > STALE_SECONDS

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    who = f"host {holder.get('host')}, process {holder.get('pid')}, since {holder.get('started')}" if (
                        holder) else "a run starting right now"
                    raise WorkdirError(f"--workdir {self.path.parent} is in use by another run ({who}); wait for it "
                                       f"to finish or stop it, or use another --workdir") from None
                log.warning("taking over the workdir lock %s left by a run that is gone (%s)", self.path,
                            holder or "unreadable")
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise WorkdirError(f"--workdir {self.path.parent} is not writable ({e.strerror}); choose a "
                                       "directory you can write to") from e
                raise write_error(self.path.parent, e) from e
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me) + "\n")
            self._heartbeat = threading.Thread(target=self._beat, name="jaxtl workdir lock", daemon=True)
            self._heartbeat.start()
            return
        raise WorkdirError(f"--workdir {self.path.parent}: could not take over its lock {self.path}; remove it if "
                           "no run is using the workdir")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._holder() == self.me:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def owned(workdir: str | Path) -> Iterator[Path]:
    """The workdir, usable and locked for the block by process 0 on behalf of the whole job (every process
    learns whether the lock was had)."""
    if "://" in str(workdir):  # Path("gs://b/run") would be a local folder "gs:/b/run"
        raise WorkdirError(f"--workdir {workdir}: a run's workdir is a local folder (its record, logs, caches and "
                           "checkpoints are written there, atomically); train into a local --workdir and copy it "
                           "to the bucket after (gsutil rsync -r, gcloud storage rsync)")
    workdir, lock, error = Path(workdir), None, None
    if is_main():
        try:
            workdir = usable(workdir)
            lock = WorkdirLock(workdir)
            lock.acquire()
        except WorkdirError as e:
            error = e
    (failed,) = any_process([error is not None])
    if failed:
        raise error or WorkdirError(f"--workdir {workdir} cannot be used (process 0 says why)")
    try:
        yield workdir
    finally:
        if lock is not None:
            lock.release()
