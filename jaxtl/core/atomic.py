"""Writing files so that a reader never sees a partial one: write beside the target, then `os.replace`; with
several processes, without two of them writing one file. JSON is always valid JSON (non-finite numbers are
written as null), and a write that fails for a reason the user must fix (a full disk, no permission) is a
`WriteError` naming the directory and the cause, with the temporaries removed. Reading back, `read_json` and
`read_json_lines` turn a damaged file (cut short, zeroed, not the JSON expected) into one error naming it."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax

from jaxtl.core.errors import RunFileError, WriteError
from jaxtl.core.processes import barrier, from_main, is_main

# Causes of a failed write that are the user's to fix, with what to do.
WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full; free space (or choose another directory) and run the same command again",
    errno.EDQUOT: "the disk quota is exceeded; free space and run the same command again",
    errno.EFBIG: "a file would exceed the size limit of this process or file system",
    errno.EACCES: "no permission to write there; choose a directory you can write to",
    errno.EPERM: "no permission to write there; choose a directory you can write to",
    errno.EROFS: "the file system is read-only; choose a writable directory",
}
_MESSAGES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
             "File too large": errno.EFBIG, "Permission denied": errno.EACCES, "Read-only file system": errno.EROFS}


def write_failure(error: BaseException) -> int | None:
    """The errno of a failed write anywhere in `error`'s chain (TensorStore and orbax wrap the OSError in their
    own exceptions, naming it only in the message), if it is one the user must fix; else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in WRITE_FAILURES:
            return error.errno
        text = str(error)
        for message, number in _MESSAGES.items():
            if message in text:
                return number
        error = error.__cause__ or error.__context__
    return None


def write_error(directory: Path | str, error: BaseException) -> WriteError:
    """The one-line `WriteError` of a failed write into `directory`."""
    number = write_failure(error)
    cause = os.strerror(number) if number else str(error).splitlines()[0][:200]
    return WriteError(f"cannot write to {directory}: {cause}: {WRITE_FAILURES.get(number, 'check the directory')}")


@contextlib.contextmanager
def writes_into(directory: Path | str) -> Iterator[None]:
    """Turns a failed write inside the block into a `WriteError` naming `directory`; other errors pass."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        if write_failure(e) is None:
            raise
        raise write_error(directory, e) from e


def plain_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, Inf) replaced by None, so the JSON written is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy and JAX scalars
        return plain_json(value.item())
    return value


def json_text(data: Any, indent: int | None = 2) -> str:
    """Valid JSON (non-finite numbers as null)."""
    return json.dumps(plain_json(data), indent=indent, allow_nan=False)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; if the block succeeds the file there replaces `path` in one step,
    otherwise it is removed. A process killed inside the block leaves only a `.<name>.*.tmp` file, never `path`."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        with writes_into(path.parent):
            yield tmp
            os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the same failure again (a read-only or full disk): the first error is the one to see
            pass


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as valid JSON at `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(data) + "\n")


def temporary_beside(path: Path) -> Path:
    """A unique temporary name beside `path`, in the `.<name>.*.tmp` pattern that readers never take."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def publish(pairs: dict[Path, Path], name: str) -> None:
    """Renames each temporary file (key) onto its target (value), all processes of a job taking part.

    One process: plain renames. Several: process 0 renames first; after a barrier every other process renames its
    own copy only where the target is not visible to it (a host-local directory), and deletes it otherwise, so no
    two processes write one file and every host ends up with the files.
    """
    if jax.process_count() == 1 or jax.process_index() == 0:
        for tmp, target in pairs.items():
            os.replace(tmp, target)
    if jax.process_count() == 1:
        return
    barrier(f"publish {name}")
    if jax.process_index() != 0:
        for tmp, target in pairs.items():
            if Path(target).exists():
                Path(tmp).unlink(missing_ok=True)
            else:
                os.replace(tmp, target)


def share(path: Path) -> None:
    """Makes the file process 0 wrote at `path` every process's, where a process sees another file or none there
    (a workdir on a host's own disk: a bucket workdir's mirror in a job of several processes); removed where
    process 0 has none. A collective: every process calls it; nothing to do with one process."""
    if jax.process_count() == 1:
        return
    path = Path(path)
    data = from_main(path.read_bytes() if is_main() and path.is_file() else None)
    if is_main():
        return
    if data is None:
        path.unlink(missing_ok=True)
    elif not path.is_file() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)


@contextlib.contextmanager
def publishing(directory: Path, names: Sequence[str], label: str = "") -> Iterator[dict[str, Path]]:
    """Yields `{name: temporary path}` beside `directory/name` for the caller to fill; when the block ends without
    an error, every file is published at once (`publish`: every process of a job takes part). The temporaries
    are removed whatever happens."""
    directory = Path(directory)
    temporaries = {name: temporary_beside(directory / name) for name in names}
    try:
        with writes_into(directory):
            directory.mkdir(parents=True, exist_ok=True)
            yield dict(temporaries)
            publish({tmp: directory / name for name, tmp in temporaries.items()}, label or str(directory))
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)


def reserve(path: Path, size: int) -> None:
    """Allocates `size` bytes of the file at `path` on disk now, so that a full disk is an error here and not a
    crash (SIGBUS) in the middle of a memory-mapped write into a sparse file."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate: write and see
            raise
    finally:
        os.close(fd)


def damage_reason(error: BaseException) -> str:
    """The first line of `error`'s message (at most 160 characters), or its type's name: the "why" of a damaged
    file's one-line error."""
    return str(error).splitlines()[0][:160] if str(error) else type(error).__name__


def read_json(path: Path, fix: str, kind: type = dict) -> Any:
    """The JSON value in `path` (a file jaxtl wrote, or one a user handed it), which must be a `kind`. A damaged
    file is a `RunFileError`: "PATH is damaged (why); FIX"."""
    try:
        value = json.loads(Path(path).read_bytes())
        if not isinstance(value, kind):
            raise ValueError(f"a JSON {type(value).__name__}, not {'an object' if kind is dict else kind.__name__}")
        return value
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise RunFileError(f"{path} is damaged ({damage_reason(e)}); {fix}") from None


def read_json_lines(path: Path) -> tuple[list[dict], list[int]]:
    """The JSON objects of a JSON-lines file, and the numbers (from 1) of the lines that are not one (cut short by a
    killed write, damaged bytes): the caller says what it does without them."""
    records, damaged = [], []
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            damaged.append(number)
    return records, damaged
