"""The content-addressed cache that the feature, decoded-image and map caches share.

An entry is a folder `<root>/<key>/`, the key the sha256 of a JSON description of everything that changes its
contents (for the caches here: the backbone and its weights, the preprocessing, every example's content and
label). Different inputs are different folders, so an entry is never updated in place, only completed: a later run
that needs another file of the same entry (another layer's features) adds it.

Files are written beside their names and renamed when complete (`jaxtl.core.atomic.publish`, once per directory
with several processes), with `meta.json` (the description, for people), so a reader never sees part of a file;
a process killed while writing leaves only `.*.tmp` files, which are never read and are deleted a day later by
the next write to the entry. Each file's sha256 is written beside it at publish time (`<name>.sha256`) and
`Entry.damage` checks it when the file is read: a file whose bytes changed since (zeroed, flipped, truncated) is
reported and recomputed, never used.

A store whose root is a URL (`features.cache_dir=gs://bucket/features`: one cache for every host of a pod, or for
the machines of a team) keeps its entries in a local mirror, `$JAXTL_CACHE_DIR/mirrors/<sha256 of the URL>/`, and
reads them there (memory-mapped, as local entries): a file the mirror lacks is fetched from the bucket when it is
asked for, and an entry's files are copied up (process 0; each file before its checksum, `meta.json` last) once
they are published locally. A fetched file passes the same checksum test, so a damaged object in the bucket is
recomputed and replaced, never used; a copy up that fails is a warning (the local entry is complete), and a missing
scheme package (gcsfs, s3fs) is one error naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from jaxtl.core import locations
from jaxtl.core.atomic import publishing
from jaxtl.core.processes import is_main

STALE_SECONDS = 86_400  # temporaries older than this were left by a killed process
log = logging.getLogger(__name__)


def plain(value: Any) -> Any:
    """A JSON-ready copy (mappings with sorted string keys, sequences as lists), so equal settings give equal
    keys whatever their container types."""
    if hasattr(value, "items"):
        return {str(k): plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def key_of(description: dict) -> str:
    """The sha256 of the description's canonical JSON."""
    return hashlib.sha256(json.dumps(plain(description), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One entry's folder and the description its key was made from; `remote`, the entry's URL where the store is
    a bucket (`path` is then its local mirror)."""

    path: Path
    description: dict
    remote: str | None = None

    def file(self, name: str) -> Path:
        """The local file `name`, fetched from the bucket first where the mirror lacks it and the bucket has it."""
        path = self.path / name
        if self.remote is not None and not path.is_file():
            url = locations.join(self.remote, name)
            try:
                locations.download(url, path)  # one request: a file the bucket lacks is its FileNotFoundError
            except FileNotFoundError:
                pass  # computed here
            except OSError as e:  # unreachable or refused: computed here, as if the bucket lacked it
                log.warning("cache file %s could not be fetched (%s); computing it here", url, e)
        return path

    @contextlib.contextmanager
    def writing(self, names: Sequence[str], label: str = "", checksummed: Sequence[str] | None = None
                ) -> Iterator[dict[str, Path]]:
        """Yields `{name: temporary path}` for the caller to fill; when the block ends without an error, every
        file, its checksum (for `checksummed`, default all) and `meta.json` are published at once. Every process
        of a job takes part (`publish`)."""
        checksummed = list(names if checksummed is None else checksummed)
        sums = [checksum_name(name) for name in checksummed]
        if self.path.is_dir():
            remove_stale_temporaries(self.path)
        with publishing(self.path, (*names, *sums, "meta.json"), label) as temporaries:
            yield {name: temporaries[name] for name in names}
            for name in checksummed:
                temporaries[checksum_name(name)].write_text(sha256_file(temporaries[name]) + "\n")
            temporaries["meta.json"].write_text(json.dumps(plain(self.description), indent=2) + "\n")
        if self.remote is not None and is_main():
            self._copy_up((*names, *sums, "meta.json"))

    def _copy_up(self, names: Sequence[str]) -> None:
        """The published files `names` copied to the bucket in their order (a file before its checksum: a reader
        there never finds a checksum without its file)."""
        try:
            for name in names:
                locations.upload(self.path / name, locations.join(self.remote, name))
        except OSError as e:
            log.warning("cache entry %s could not be copied to %s (%s); it is complete here, and computed again "
                        "where the bucket lacks it", self.path, self.remote, e)

    def damage(self, name: str) -> str | None:
        """Why the file `name` cannot be trusted (missing, no checksum, bytes changed since it was published), or
        None if it is as written."""
        path, recorded = self.file(name), self.file(checksum_name(name))
        if not path.is_file():
            return "missing"
        if not recorded.is_file():
            return "its checksum file is missing"
        try:
            expected = recorded.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return "its checksum file is unreadable"
        if sha256_file(path) != expected:
            return "its bytes changed since it was written (sha256 mismatch)"
        return None


class Store:
    """Entries under `root`, one per description: a local folder, or a URL whose entries are mirrored in
    `mirror_of(root)`."""

    def __init__(self, root: locations.Location):
        self.remote = root.rstrip("/") if locations.is_url(root) else None
        self.root = mirror_of(self.remote) if self.remote else Path(root)

    def entry(self, description: dict) -> Entry:
        key = key_of(description)
        return Entry(self.root / key, plain(description), self.remote and locations.join(self.remote, key))


def mirror_of(url: str) -> Path:
    """The local folder that mirrors the store at `url`: `$JAXTL_CACHE_DIR/mirrors/<first 16 of its sha256>`."""
    return locations.local_mirror(url, "mirrors")


def checksum_name(name: str) -> str:
    return f"{name}.sha256"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale_temporaries(directory: Path, max_age_s: float = STALE_SECONDS) -> None:
    """Deletes `.*.tmp` files a killed process left more than `max_age_s` ago (a live writer's are younger)."""
    now = time.time()
    for tmp in directory.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
        except FileNotFoundError:
            pass
