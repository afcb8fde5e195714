"""Writing files so that a reader never sees a partial one: write beside the target, then `os.replace`; with
several processes, without two of them writing one file."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import jax

from jaxtl.core.processes import barrier


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; if the block succeeds the file there replaces `path` in one step,
    otherwise it is removed. A process killed inside the block leaves only a `.<name>.*.tmp` file, never `path`."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


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


@contextlib.contextmanager
def publishing(directory: Path, names: Sequence[str], label: str = "") -> Iterator[dict[str, Path]]:
    """Yields `{name: temporary path}` beside `directory/name` for the caller to fill; when the block ends without
    an error, every file is published at once (`publish`: every process of a job takes part). The temporaries
    are removed whatever happens."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    temporaries = {name: temporary_beside(directory / name) for name in names}
    try:
        yield dict(temporaries)
        publish({tmp: directory / name for name, tmp in temporaries.items()}, label or str(directory))
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)
