"""What is known about a dataset folder's files, so that a second run does not read them all again: per file its
size and modification time (checked with one `stat`), whether it decoded, and its content sha256 once computed.

The manifest of a folder is `$JAXTL_CACHE_DIR/manifests/<sha256 of the folder's path>.json`: a line with the
sha256 of the JSON that follows it. An entry counts only while the file's size and modification time are those
recorded; a changed file is verified and hashed again. Written atomically, by process 0 of a job; a manifest
whose checksum or structure is wrong (damaged) is ignored, with a warning, and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from jaxtl.core import locations
from jaxtl.core.atomic import atomic_path
from jaxtl.core.locations import Location
from jaxtl.core.paths import cache_dir
from jaxtl.core.processes import is_main

log = logging.getLogger(__name__)


class Manifest:
    """`{relative path: [size, mtime_ns, decodes (bool), sha256 or None]}` of the files under `root` (a local folder
    or a URL's: then the version is its store's, `jaxtl.core.locations.stamp`)."""

    def __init__(self, root: Location, location: Path | None = None):
        self.root = root if locations.is_url(root) else Path(root).absolute()
        self._prefix = str(self.root).rstrip("/") + ("/" if locations.is_url(root) else os.sep)
        key = hashlib.sha256(str(self.root).encode()).hexdigest()[:32]
        self.path = Path(location or cache_dir() / "manifests") / f"{key}.json"
        self._lock = threading.Lock()
        self._changed = False
        self.entries = self._read()

    def _read(self) -> dict:
        """The stored entries, or {} when there are none or they cannot be trusted (then they are rebuilt)."""
        try:
            raw = self.path.read_bytes()
        except OSError:
            return {}
        digest, _, body = raw.partition(b"\n")
        try:
            if hashlib.sha256(body).hexdigest().encode() != digest:
                raise ValueError("checksum mismatch")
            stored = json.loads(body)
            entries = stored["files"] if stored["root"] == str(self.root) else {}
            if not (isinstance(entries, dict) and all(isinstance(e, list) and len(e) == 4 for e in entries.values())):
                raise ValueError("unexpected structure")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("manifest %s is damaged (%s); checking every image again", self.path, e)
            return {}
        return entries

    def _key(self, path: Location) -> str:
        text = str(path)
        if text.startswith(self._prefix):
            return text[len(self._prefix):]
        return text if locations.is_url(path) else os.path.relpath(os.path.abspath(text), self.root)

    def _current(self, path: Location) -> tuple[list | None, tuple]:
        stamp = locations.stamp(path)
        entry = self.entries.get(self._key(path))
        if entry and entry[0] == stamp[0] and entry[1] == stamp[1]:
            return entry, stamp
        return None, stamp

    def decodes(self, path: Path) -> bool:
        """Whether `path` is recorded, unchanged, as decoding."""
        entry, _ = self._current(path)
        return bool(entry and entry[2])

    def mark_decodes(self, path: Path, sha256: str | None = None) -> None:
        """Records that `path` decodes (and its content's sha256, when the caller read it anyway)."""
        entry, stamp = self._current(path)
        with self._lock:
            known = entry[3] if entry else None
            self.entries[self._key(path)] = [*stamp, True, sha256 or known]
            self._changed = True

    def sha256(self, path: Path) -> str:
        """The file's content sha256: recorded, or read now (and recorded)."""
        entry, stamp = self._current(path)
        if entry and entry[3]:
            return entry[3]
        digest = hashlib.sha256(locations.read_bytes(path)).hexdigest()
        with self._lock:
            self.entries[self._key(path)] = [*stamp, bool(entry and entry[2]), digest]
            self._changed = True
        return digest

    def save(self) -> None:
        """Writes the manifest if anything was learnt (process 0 of a job)."""
        if not self._changed or not is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, atomic_path(self.path) as tmp:
            body = json.dumps({"root": str(self.root), "files": self.entries}, separators=(",", ":")).encode()
            tmp.write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
            self._changed = False

    def __getstate__(self) -> dict:  # Grain's worker processes get the location only, never the entries
        return {"root": self.root, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.root, self.path, self.entries = state["root"], state["path"], {}
        self._prefix = str(self.root).rstrip("/") + ("/" if locations.is_url(self.root) else os.sep)
        self._lock, self._changed = threading.Lock(), False


def map_in_chunks(fn, items: list, workers: int = 16, chunk: int = 256) -> list:
    """`[fn(x) for x in items]` in threads, `chunk` items per task (a future per file would cost more than a
    `stat`)."""
    from concurrent.futures import ThreadPoolExecutor

    if not items:
        return []
    parts = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    with ThreadPoolExecutor(min(workers, len(parts))) as pool:
        return [result for part in pool.map(lambda xs: [fn(x) for x in xs], parts) for result in part]
