"""The content-addressed cache that the feature, decoded-image and map caches share.

An entry is a folder `<root>/<key>/`, the key the sha256 of a JSON description of everything that changes its
contents (for the caches here: the backbone and its weights, the preprocessing, every example's content and
label). Different inputs are different folders, so an entry is never updated in place, only completed: a later run
that needs another file of the same entry (another layer's features) adds it.

Files are written beside their names and renamed when complete (`jaxtl.core.atomic.publish`, once per directory
with several processes), with `meta.json` (the description, for people), so a reader never sees part of a file;
a process killed while writing leaves only `.*.tmp` files, which are never read and are deleted a day later by
the next write to the entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from jaxtl.core.atomic import publishing

STALE_SECONDS = 86_400  # temporaries older than this were left by a killed process


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
    """One entry's folder and the description its key was made from."""

    path: Path
    description: dict

    def file(self, name: str) -> Path:
        return self.path / name

    @contextlib.contextmanager
    def writing(self, names: Sequence[str], label: str = "") -> Iterator[dict[str, Path]]:
        """Yields `{name: temporary path}` for the caller to fill; when the block ends without an error, every
        file (and `meta.json`) is published at once. Every process of a job takes part (`publish`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        with publishing(self.path, (*names, "meta.json"), label) as temporaries:
            meta = temporaries.pop("meta.json")
            yield temporaries
            meta.write_text(json.dumps(plain(self.description), indent=2) + "\n")


class Store:
    """Entries under `root`, one per description."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, description: dict) -> Entry:
        return Entry(self.root / key_of(description), plain(description))


def remove_stale_temporaries(directory: Path, max_age_s: float = STALE_SECONDS) -> None:
    """Deletes `.*.tmp` files a killed process left more than `max_age_s` ago (a live writer's are younger)."""
    now = time.time()
    for tmp in directory.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
        except FileNotFoundError:
            pass
