"""Where a run's images come from: `data.source = "folder"` (a path, `$VARS` expanded).

A folder that is missing but has a `data.download_url` is fetched once (zip archive, extracted atomically);
offline, the error says which folder to create from which archive.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import ml_collections

from jaxtl.data.folder import ImageDataset, folder_dataset


def data_dir() -> Path:
    """`$JAXTL_DATA_DIR`, default `~/.cache/jaxtl/data`."""
    return Path(os.environ.get("JAXTL_DATA_DIR") or Path.home() / ".cache" / "jaxtl" / "data")


def resolve_path(path: str) -> Path:
    """Expands `$JAXTL_DATA_DIR` (with its default) and other variables, and `~`."""
    env = dict(os.environ, JAXTL_DATA_DIR=str(data_dir()))
    expanded = path
    for name, value in env.items():
        expanded = expanded.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return Path(expanded).expanduser()


def fetch_archive(url: str, target: Path) -> None:
    """Downloads a zip and extracts the folder it holds to `target`, never leaving a partial folder there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        archive = Path(tmp) / "archive.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise FileNotFoundError(
                f"dataset folder '{target}' is missing and {url} could not be downloaded ({e}). Download and unzip "
                f"it elsewhere so that '{target}' holds its class folders (or set JAXTL_DATA_DIR to a folder "
                f"containing '{target.name}')."
            ) from e
        with zipfile.ZipFile(archive) as z:
            z.extractall(Path(tmp) / "extracted")
        extracted = Path(tmp) / "extracted" / target.name
        if not extracted.is_dir():
            raise ValueError(f"{url} does not contain a top-level '{target.name}' folder")
        os.replace(extracted, target)


def load_dataset(data: ml_collections.ConfigDict, seed: int) -> ImageDataset:
    if data.source != "folder":
        raise ValueError(f"unknown data.source '{data.source}'; supported: 'folder'")
    if not data.path:
        raise ValueError("data.path is empty; set it to a folder of class sub-folders")
    path = resolve_path(data.path)
    if not path.is_dir() and data.download_url:
        fetch_archive(data.download_url, path)
    return folder_dataset(path, data.val_fraction, data.test_fraction, seed, data.skip_bad_images)
