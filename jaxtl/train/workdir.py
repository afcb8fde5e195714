"""A run's workdir: checked to be a directory this process can write, and locked by the run that owns it, so two
`train` commands started on one workdir by mistake cannot both write it.

The lock is `WORKDIR/.lock` (JSON: host, process id, start time, command), created exclusively by process 0 of the
job and removed when the run ends. A second run finds it and stops at once, naming the holder. A lock left by a
run that was killed is stale and taken over, with a warning: on the same host, when its process no longer exists;
from another host, when its heartbeat (the file's modification time, touched every `HEARTBEAT_SECONDS` by the
holder) is older than `STALE_SECONDS`.

A workdir may be a URL (`--workdir gs://bucket/runs/x`, any fsspec scheme whose package is installed). A job of one
process (one host, every accelerator of it) works in a local mirror, `$JAXTL_CACHE_DIR/workdirs/<sha256 of the
URL>/`, where renames, appends, memory maps and the lock work as in any workdir (`Mirror`). First the
mirror is made the bucket's copy (what it lacks, or holds in another version, fetched; what the bucket lacks
removed); while the run trains, what changed is copied up every `PUSH_SECONDS` (checkpoint files before the run's
record files; files rotated away deleted after, so the bucket always keeps a whole checkpoint) and once more when
it ends, preempted included. A run preempted on one machine resumes on another from the bucket; a checkpoint
copied up in part is damaged there and the one before it is used (`jaxtl.train.checkpoints`). `eval`, `predict`,
`export`, `report` and `lr_find` read such a workdir through the same mirror (`workdir_at`), and copy up what they
write.
A run's claim on a bucket workdir is `URL/.lock` (`BucketLock`), as the local lock is for its mirror: a `train` on
another machine finds it and stops at once, naming the holder.

A job of several processes (a TPU pod's hosts) may work in a bucket too. Process 0 claims it; then every process
makes its own mirror (process i > 0 in `<...>-process<i>`), and process 0 alone copies up, as it alone writes the
run's record files. orbax's checkpoints are written by every process into one folder, which per-host mirrors
cannot give: so such a job's checkpoints (`checkpoints/`, `best/`, and `auto`'s trials') are written and read by
orbax straight in the bucket (`straight_url`), and are not mirrored. orbax writes `gs://` (and local paths; a
`local://` URL, a local folder read as a bucket, is how the tests stand in for one); other schemes are refused
before any work. A folder every process sees (a shared file system, gcsfuse) needs none of this.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import jax

from jaxtl.core import locations
from jaxtl.core.atomic import write_error, write_json_atomic
from jaxtl.core.errors import JaxtlError, MissingFileError, WorkdirError
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


class BucketLock:
    """A run's claim on a workdir in a bucket: `URL/.lock`, the local lock's JSON with a token of this run and
    `beat`, the holder's clock when it last wrote the claim (at the start and at every copy up). A run that finds
    another's claim stops at once, naming it, unless the claim is stale: left by a process of this host that no
    longer exists, or not written for `STALE_SECONDS` (the holder killed, or its machine gone); a stale claim is taken
    over with a warning. Removed when the run ends, preempted included. Written, then read back: of two runs started
    on one workdir within the same moment, the one whose claim was overwritten stops."""

    def __init__(self, url: str):
        self.url = locations.join(url, LOCK)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join(sys.argv)[:300], "token": secrets.token_hex(8)}

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(locations.read_bytes(self.url))
        except (MissingFileError, ValueError):
            return None  # none, or half-written
        return holder if isinstance(holder, dict) else None

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == self.me["host"] and not _alive(int(holder.get("pid", -1))):
            return True
        return time.time() - float(holder.get("beat", 0)) > STALE_SECONDS

    def acquire(self) -> None:
        holder = self._holder()
        if holder is not None and holder.get("token") != self.me["token"]:
            if not self._stale(holder):
                seen = time.time() - float(holder.get("beat", 0))
                raise WorkdirError(
                    f"--workdir {locations.parent(self.url)} is in use by another run (host {holder.get('host')}, "
                    f"process {holder.get('pid')}, since {holder.get('started')}; its claim {self.url} written "
                    f"{max(seen, 0):.0f} s ago); wait for it to finish or stop it, or use another --workdir. A "
                    f"killed run's claim lapses {STALE_SECONDS:.0f} s after it was last written")
            log.warning("taking over the claim %s left by a run that is gone (%s)", self.url, holder)
        self.beat()
        if (self._holder() or {}).get("token") != self.me["token"]:
            raise WorkdirError(f"--workdir {locations.parent(self.url)} was claimed by another run starting at the "
                               "same moment; use another --workdir, or run again once it has finished")

    def beat(self) -> None:
        locations.write_bytes(self.url, (json.dumps(self.me | {"beat": time.time()}) + "\n").encode())

    def release(self) -> None:
        if (self._holder() or {}).get("token") == self.me["token"]:
            locations.remove(self.url)


CHECKPOINT_FOLDERS = ("checkpoints", "best")
_STRAIGHT: dict[Path, str] = {}  # a job of several processes: each bucket workdir's mirror here -> its URL


def straight_url(directory: Path) -> str | None:
    """Where orbax keeps the checkpoints of the run in `directory` (a workdir, or a trial's folder under it) when
    that is (under) a bucket workdir's mirror in a job of several processes: the URL of the same folder in the
    bucket. None for any other directory (its checkpoints are in it)."""
    directory = Path(directory).absolute()
    for local, url in _STRAIGHT.items():
        if directory == local or local in directory.parents:
            return locations.join(url, *directory.relative_to(local).parts)
    return None


def orbax_directory(url: str):
    """The path orbax is given for a folder in a bucket: `gs://` as it is (TensorStore writes it), a `local://` URL
    as its local path; other schemes are a `WorkdirError` saying what to do."""
    scheme, rest = url.split("://", 1)
    if scheme == "local":
        return Path("/" + rest.lstrip("/"))
    if scheme in ("gs", "gcs"):
        from etils import epath

        return epath.Path(f"gs://{rest}")
    raise WorkdirError(f"--workdir {url}: a job of several processes writes its checkpoints straight to the bucket "
                       f"with orbax, which writes gs:// (not {scheme}://); use a gs:// bucket, or a folder every "
                       "process sees (a shared file system)")


def _stop_together(error: JaxtlError | None, elsewhere: str) -> None:
    """Every process of the job learns whether a step failed on any of them (a collective) and stops if so: with
    its own `error`, or a `WorkdirError` saying `elsewhere` where the step failed on another process."""
    (failed,) = any_process([error is not None])
    if failed:
        raise error or WorkdirError(elsewhere)


def _copied(path: Path) -> bool:
    """Whether a file of the workdir is copied to its bucket: not the lock, temporaries (`.name.*.tmp`), `auto`'s
    trials in `.trials/`, or an orbax checkpoint still being written (its `*.orbax-checkpoint-tmp*` folder)."""
    return not any(part.startswith(".") or ".orbax-checkpoint-tmp" in part for part in path.parts)


SYNCED = ".synced.json"  # in a mirror: each file's version in the bucket and its stat here when they were the same


class Mirror:
    """A workdir at `url` and its local copy (`path`): `pull` makes the copy the bucket's, `push` copies up what
    changed here since (and deletes there what was deleted here).

    A file of the copy is kept by `pull` only if neither side changed since they were last the same: the bucket's
    `(size, version)` (its store's generation, ETag or modification time) and the copy's `(size, mtime_ns)` as
    `SYNCED` recorded them; any other file is fetched (a run continued on another machine since, or this machine's
    run killed before it copied its last files up)."""

    def __init__(self, url: str, process: int = 0, straight: bool = False):
        self.url = url.rstrip("/")
        self.path = locations.local_mirror(self.url, "workdirs")
        if process:  # a job's other processes: each its own (they may share a disk)
            self.path = self.path.with_name(f"{self.path.name}-process{process}")
        self.straight = straight  # the checkpoint folders are orbax's, in the bucket: not mirrored
        self.sent: dict[str, tuple[int, int]] = {}  # (size, mtime_ns) of each file as the bucket holds it
        self.synced: dict[str, dict[str, list]] = {}  # SYNCED: {file: {"bucket": [size, version], "here": [...]}}

    def _read_synced(self) -> dict[str, dict[str, list]]:
        try:
            synced = json.loads((self.path / SYNCED).read_text())
        except (OSError, ValueError):
            return {}  # none yet, or damaged: every file is fetched
        return synced if isinstance(synced, dict) else {}

    def _record(self, there: dict[str, tuple[int, int | str]], here: dict[str, tuple[int, int]],
                names) -> None:
        for name in names:
            if name in there and name in here:
                self.synced[name] = {"bucket": list(there[name]), "here": list(here[name])}
            else:
                self.synced.pop(name, None)
        write_json_atomic(self.path / SYNCED, self.synced)

    def _mirrored(self, relative: Path) -> bool:
        return _copied(relative) and not (self.straight and relative.parts[0] in CHECKPOINT_FOLDERS)

    def _here(self) -> dict[str, tuple[int, int]]:
        found = {}
        for path in self.path.rglob("*"):
            relative = path.relative_to(self.path)
            if self._mirrored(relative):
                try:
                    if path.is_file():
                        stat = path.stat()
                        found[relative.as_posix()] = (stat.st_size, stat.st_mtime_ns)
                except FileNotFoundError:  # rotated away while listed
                    pass
        return found

    def pull(self) -> Path:
        there = {name: stamp for name, stamp in locations.listing(self.url).items() if self._mirrored(Path(name))}
        here, synced = (self._here(), self._read_synced()) if self.path.is_dir() else ({}, {})
        for relative in here.keys() - there.keys():
            (self.path / relative).unlink(missing_ok=True)
        for relative, stamp in sorted(there.items()):
            same = {"bucket": list(stamp), "here": list(here.get(relative, ()))}
            if synced.get(relative) != same:
                locations.download(locations.join(self.url, relative), self.path / relative)
        self.path.mkdir(parents=True, exist_ok=True)
        self.sent = self._here()
        self.synced = {}
        self._record(there, self.sent, there)
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
        deleted = sorted(self.sent.keys() - here.keys())
        for relative in deleted:
            locations.remove(locations.join(self.url, relative))
            del self.sent[relative]
        if changed or deleted:
            sent = [name for name in changed if self.sent.get(name) == here[name]]
            self._record(locations.listing(self.url), here, [*sent, *deleted])


@contextlib.contextmanager
def mirrored(url: str, writes: bool = True, claim: bool = False) -> Iterator[Path]:
    """The local mirror of the workdir at `url`, made the bucket's copy first; with `writes`, what changes in it
    is copied up every `PUSH_SECONDS` and when the block ends; with `claim`, the run's `BucketLock` is taken
    before anything is read, written again at every copy up and removed at the end. In a job of several
    processes, process 0 claims and copies up, every process has its own mirror, and with `writes` the
    checkpoints are orbax's in the bucket (`straight_url`)."""
    several, main = jax.process_count() > 1, is_main()
    if several and writes:
        orbax_directory(url)  # a scheme orbax cannot write: refused before any work
    mirror = Mirror(url, jax.process_index() if several else 0, straight=several and writes)
    lock = BucketLock(url) if claim and main else None

    def release():
        if lock is not None:
            with contextlib.suppress(OSError, JaxtlError):
                lock.release()

    def together(step, what: str) -> None:
        """`step` on every process; if it fails on any, every process stops (with its error, or process 0's)."""
        error = None
        try:
            step()
        except OSError as e:
            error = WorkdirError(f"--workdir {url} cannot be {what} ({e}); check the URL and your access to it")
        except JaxtlError as e:
            error = e
        try:
            _stop_together(error, f"--workdir {url} cannot be {what} by another process of the job; its error says "
                                  "why")
        except JaxtlError:
            release()
            raise

    together(lock.acquire if lock is not None else lambda: None, "claimed")
    together(mirror.pull, "read")
    if mirror.straight:
        _STRAIGHT[mirror.path.absolute()] = url
    if not (writes and main):
        try:
            yield mirror.path
        finally:
            _STRAIGHT.pop(mirror.path.absolute(), None)
            release()
        return
    stop = threading.Event()

    def copy_up():
        while not stop.wait(PUSH_SECONDS):
            try:
                mirror.push()
                if lock is not None:
                    lock.beat()
            except (OSError, JaxtlError) as e:
                log.warning("copying %s to %s failed (%s); trying again in %.0f s", mirror.path, url, e, PUSH_SECONDS)

    thread = threading.Thread(target=copy_up, name="jaxtl-workdir-push", daemon=True)
    thread.start()
    try:
        yield mirror.path
    finally:
        _STRAIGHT.pop(mirror.path.absolute(), None)
        stop.set()
        thread.join()
        try:
            mirror.push()
        except OSError as e:
            raise WorkdirError(f"--workdir {url}: the run's files are complete in {mirror.path}, but copying them to "
                               f"the bucket failed ({e}); copy them with gcloud storage rsync -r {mirror.path} "
                               f"{url}") from None
        finally:
            release()


@contextlib.contextmanager
def workdir_at(workdir: str | Path, writes: bool = False, claim: bool = False) -> Iterator[Path]:
    """A workdir to read (and, with `writes`, to write) with local paths: itself, or for a URL its mirror (with
    `claim`, held by this run: `mirrored`)."""
    if locations.is_url(str(workdir)):
        with mirrored(str(workdir), writes, claim) as local:
            yield local
    else:
        yield Path(workdir)


@contextlib.contextmanager
def owned(workdir: str | Path) -> Iterator[Path]:
    """The workdir (for a URL, its local mirror, `mirrored`), usable and locked for the block by process 0 on behalf
    of the whole job (every process learns whether the lock was had)."""
    if locations.is_url(str(workdir)):
        with mirrored(str(workdir), claim=True) as local, owned(local) as locked:
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
    _stop_together(error, f"--workdir {workdir} cannot be used (process 0 says why)")
    try:
        yield workdir
    finally:
        if lock is not None:
            lock.release()
