"""A run's workdir: checked to be a directory this process can write, and locked by the run that owns it, so two
`train` commands started on one workdir by mistake cannot both write it.

The lock is `WORKDIR/.lock` (JSON: host, process id, start time, command), created exclusively by process 0 of the
job and removed when the run ends. A second run finds it and stops at once, naming the holder. A lock left by a
run that was killed is stale and taken over, with a warning: on the same host, when its process no longer exists;
from another host, when its heartbeat (the file's modification time, touched every `HEARTBEAT_SECONDS` by the
holder) is older than `STALE_SECONDS`.

A workdir may be a URL (`--workdir gs://bucket/runs/x`, any fsspec scheme whose package is installed) for a job of
one process (one host, every accelerator of it): the run works in a local mirror, `$JAXTL_CACHE_DIR/workdirs/<sha256
of the URL>/`, where renames, appends, memory maps and the lock work as in any workdir (`Mirror`). First the
mirror is made the bucket's copy (what it lacks, or holds at another size, fetched; what the bucket lacks removed);
while the run trains, what changed is copied up every `PUSH_SECONDS` (checkpoint files before the run's record
files; files rotated away deleted after, so the bucket always keeps a whole checkpoint) and once more when it ends,
preempted included. A run preempted on one machine resumes on another from the bucket; a checkpoint copied up in
part is damaged there and the one before it is used (`jaxtl.train.checkpoints`). `eval`, `predict`, `export`,
`report` and `lr_find` read such a workdir through the same mirror (`workdir_at`), and copy up what they write.
Several processes need storage every one of them sees (a shared file system, or a bucket mounted with gcsfuse).
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

import jax

from jaxtl.core import locations
from jaxtl.core.atomic import write_error
from jaxtl.core.errors import JaxtlError, WorkdirError
from jaxtl.core.processes import any_process, is_main

log = logging.getLogger(__name__)

LOCK = ".lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0
PUSH_SECONDS = 60.0


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


def _copied(path: Path) -> bool:
    """Whether a file of the workdir is copied to its bucket: not the lock, temporaries (`.name.*.tmp`), `auto`'s
    trials in `.trials/`, or an orbax checkpoint still being written (its `*.orbax-checkpoint-tmp*` folder)."""
    return not any(part.startswith(".") or ".orbax-checkpoint-tmp" in part for part in path.parts)


class Mirror:
    """A workdir at `url` and its local copy (`path`): `pull` makes the copy the bucket's, `push` copies up what
    changed here since (and deletes there what was deleted here)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.path = locations.local_mirror(self.url, "workdirs")
        self.sent: dict[str, tuple[int, int]] = {}  # (size, mtime_ns) of each file as the bucket holds it

    def _here(self) -> dict[str, tuple[int, int]]:
        found = {}
        for path in self.path.rglob("*"):
            relative = path.relative_to(self.path)
            if _copied(relative):
                try:
                    if path.is_file():
                        stat = path.stat()
                        found[relative.as_posix()] = (stat.st_size, stat.st_mtime_ns)
                except FileNotFoundError:  # rotated away while listed
                    pass
        return found

    def pull(self) -> Path:
        there, here = locations.listing(self.url), self._here() if self.path.is_dir() else {}
        for relative in here.keys() - there.keys():
            (self.path / relative).unlink(missing_ok=True)
        for relative, size in sorted(there.items()):
            if _copied(Path(relative)) and here.get(relative, (None,))[0] != size:
                locations.download(locations.join(self.url, relative), self.path / relative)
        self.path.mkdir(parents=True, exist_ok=True)
        self.sent = self._here()
        return self.path

    def push(self) -> None:
        here = self._here()
        changed = [relative for relative, stat in here.items() if self.sent.get(relative) != stat]
        for relative in sorted(changed, key=lambda r: ("/" not in r, r)):  # checkpoints, then the record files
            try:
                locations.upload(self.path / relative, locations.join(self.url, relative))
            except FileNotFoundError:  # rotated away since listed
                continue
            self.sent[relative] = here[relative]
        for relative in sorted(self.sent.keys() - here.keys()):
            locations.remove(locations.join(self.url, relative))
            del self.sent[relative]


@contextlib.contextmanager
def mirrored(url: str, writes: bool = True) -> Iterator[Path]:
    """The local mirror of the workdir at `url`, made the bucket's copy first; with `writes`, what changes in it
    is copied up every `PUSH_SECONDS` and when the block ends."""
    if jax.process_count() > 1:
        raise WorkdirError(f"--workdir {url}: a workdir in a bucket is for a job of one process; give several "
                           "processes a folder every one of them sees (a shared file system, or the bucket mounted "
                           "with gcsfuse)")
    mirror = Mirror(url)
    try:
        mirror.pull()
    except OSError as e:
        raise WorkdirError(f"--workdir {url} cannot be read ({e}); check the URL and your access to it") from None
    if not writes:
        yield mirror.path
        return
    stop = threading.Event()

    def copy_up():
        while not stop.wait(PUSH_SECONDS):
            try:
                mirror.push()
            except (OSError, JaxtlError) as e:
                log.warning("copying %s to %s failed (%s); trying again in %.0f s", mirror.path, url, e, PUSH_SECONDS)

    thread = threading.Thread(target=copy_up, name="jaxtl-workdir-push", daemon=True)
    thread.start()
    try:
        yield mirror.path
    finally:
        stop.set()
        thread.join()
        try:
            mirror.push()
        except OSError as e:
            raise WorkdirError(f"--workdir {url}: the run's files are complete in {mirror.path}, but copying them to "
                               f"the bucket failed ({e}); copy them with gcloud storage rsync -r {mirror.path} "
                               f"{url}") from None


@contextlib.contextmanager
def workdir_at(workdir: str | Path, writes: bool = False) -> Iterator[Path]:
    """A workdir to read (and, with `writes`, to write) with local paths: itself, or for a URL its mirror."""
    if locations.is_url(str(workdir)):
        with mirrored(str(workdir), writes) as local:
            yield local
    else:
        yield Path(workdir)


@contextlib.contextmanager
def owned(workdir: str | Path) -> Iterator[Path]:
    """The workdir (for a URL, its local mirror, `mirrored`), usable and locked for the block by process 0 on behalf
    of the whole job (every process learns whether the lock was had)."""
    if locations.is_url(str(workdir)):
        with mirrored(str(workdir)) as local, owned(local) as locked:
            yield locked
        return
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
