"""The path layer for a run's data: a location is a local `Path`, or a URL (`gs://bucket/images`, `s3://...`,
`memory://...`, `https://...`) read through fsspec's file system for its scheme, so that a folder or manifest in a
bucket is read as one on disk is, where the scheme's package is installed (gcsfs for `gs://`, s3fs for `s3://`).

Local paths keep the standard library's calls (and PIL opening files by name); only URLs go through fsspec. The
feature cache may be a URL too (`jaxtl.core.store`), and so may a run's workdir (`jaxtl.train.workdir`): both are
mirrored in a local folder and fetched and copied up file by file (`download`, `upload`, `listing`, `remove`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path
from typing import Union

from jaxtl.core.atomic import temporary_beside
from jaxtl.core.errors import ConfigError, MissingFileError
from jaxtl.core.paths import cache_dir, resolve_path

Location = Union[Path, str]  # a local path, or a URL (a str with a scheme)

_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub"}


def is_url(location: Location) -> bool:
    """Whether `location` is a URL for fsspec (a `file://` URL is a local path)."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def location(text: str | Path) -> Location:
    """A config's path as a location: `$JAXTL_DATA_DIR` (with its default), other variables and `~` expanded; a URL
    stays a string, anything else is a local `Path` (`file://` stripped)."""
    text = str(text)
    if "://" in text:
        expanded = os.path.expandvars(text)
        return Path(expanded[len("file://"):]) if expanded.startswith("file://") else expanded
    return resolve_path(text)


def as_location(location: Location) -> Location:
    """A location already resolved (no variables expanded): a URL as it is, anything else as a `Path`."""
    return location if is_url(location) else Path(location)


def _fs(url: str):
    """`(file system, path within it)` of a URL; a scheme whose package is not installed is an error naming it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        package = _PACKAGES.get(scheme, f"the fsspec implementation for {scheme}://")
        raise ConfigError(f"{url}: reading {scheme}:// needs {package}; pip install {package} (or use a local "
                          "path)") from e
    except ValueError as e:  # a scheme fsspec does not know
        raise ConfigError(f"{url}: {e}; give a local path or a URL fsspec reads (gs://, s3://, https://, ...)") from e


def read_bytes(location: Location) -> bytes:
    if not is_url(location):
        return Path(location).read_bytes()
    fs, path = _fs(location)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise MissingFileError(f"'{location}' does not exist") from None


def read_text(location: Location, encoding: str = "utf-8") -> str:
    return read_bytes(location).decode(encoding)


def is_file(location: Location) -> bool:
    if not is_url(location):
        return Path(location).is_file()
    fs, path = _fs(location)
    return fs.isfile(path)


def is_dir(location: Location) -> bool:
    if not is_url(location):
        return Path(location).is_dir()
    fs, path = _fs(location)
    return fs.isdir(path)


def join(location: Location, *parts: str) -> Location:
    if not is_url(location):
        return Path(location).joinpath(*parts)
    return posixpath.join(location.rstrip("/"), *parts)


def parent(location: Location) -> Location:
    if not is_url(location):
        return Path(location).parent
    scheme, rest = location.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


def name(location: Location) -> str:
    return Path(location).name if not is_url(location) else posixpath.basename(location.rstrip("/"))


def suffix(location: Location) -> str:
    return os.path.splitext(name(location))[1]


def is_absolute(text: str) -> bool:
    """Whether a path a manifest lists is absolute (a local absolute path, or a URL)."""
    return "://" in text or Path(text).expanduser().is_absolute()


def stamp(location: Location) -> tuple[int, int | str]:
    """`(size, version)` of a file, which changes when the file does: the modification time in ns for a local
    file (one `stat`); for a URL its store's modification time, generation or ETag."""
    if not is_url(location):
        stat = os.stat(location)
        return stat.st_size, stat.st_mtime_ns
    fs, path = _fs(location)
    return _stamp(fs.info(path))


def _stamp(info: dict) -> tuple[int, int | str]:
    """`(size, version)` of an fsspec file entry (`info`, or a value of `find(detail=True)`)."""
    version = next((info[key] for key in ("mtime", "updated", "LastModified", "generation", "ETag", "etag", "created")
                    if info.get(key) is not None), "")
    return int(info.get("size") or 0), version if isinstance(version, (int, str)) else str(version)


def subfolders(location: Location) -> list[str]:
    """The names of the folders in `location` (not hidden), sorted."""
    if not is_url(location):
        return sorted(d.name for d in Path(location).iterdir() if d.is_dir() and not d.name.startswith("."))
    fs, path = _fs(location)
    names = (posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True) if e["type"] == "directory")
    return sorted(n for n in names if not n.startswith("."))


def local_mirror(url: str, kind: str) -> Path:
    """The local folder that mirrors `url`: `$JAXTL_CACHE_DIR/<kind>/<first 16 hex digits of the URL's sha256>`."""
    return cache_dir() / kind / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def listing(url: str) -> dict[str, tuple[int, int | str]]:
    """`{path relative to url: (size, version)}` of every object under the URL `url` (none if nothing is there);
    the version as `stamp` gives it."""
    fs, path = _fs(url)
    root = path.rstrip("/")
    if not fs.exists(root):
        return {}
    return {entry[len(root) + 1:]: _stamp(info)
            for entry, info in fs.find(root, detail=True).items() if entry.startswith(root + "/")}


def remove(url: str) -> None:
    """Deletes the object at `url` (nothing if it is gone)."""
    fs, path = _fs(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def remove_tree(url: str) -> None:
    """Deletes everything under `url` (nothing if it is gone)."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def move(source: str, target: str) -> None:
    """Moves everything under the URL `source` to `target` (a bucket copies and deletes)."""
    fs, path = _fs(source)
    fs.mv(path, _fs(target)[1], recursive=True)


def download(url: str, target: Path) -> None:
    """Copies the object at `url` to the local file `target`, which appears whole (written beside it, then renamed)
    or not at all."""
    fs, path = _fs(url)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_beside(target)  # never read, and removed with the other stale temporaries
    try:
        fs.get_file(path, str(partial))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _with_folder(fs, path: str) -> str:
    """`path`, its folder made first on a file system that has folders (a `local://` URL; a bucket has none)."""
    if "local" in fs.protocol:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    return path


def write_bytes(url: str, data: bytes) -> None:
    """Writes `data` as the object at `url` (one object, replacing any there)."""
    fs, path = _fs(url)
    fs.pipe_file(_with_folder(fs, path), data)


def upload(source: Path, url: str) -> None:
    """Copies the local file `source` to `url` (one object, replacing any there)."""
    fs, path = _fs(url)
    fs.put_file(str(source), _with_folder(fs, path))


def files_under(location: Location, suffixes: tuple[str, ...]) -> list[str]:
    """The URLs of the files under a URL `location` (recursively) whose names end in one of `suffixes` (any case),
    sorted."""
    fs, path = _fs(location)
    return sorted(fs.unstrip_protocol(entry) for entry in fs.find(path)
                  if os.path.splitext(entry)[1].lower() in suffixes)
