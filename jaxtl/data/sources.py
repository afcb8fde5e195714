"""Where a run's images come from: `DataSource`, the resolved `data` section of a run's config.

- `source = "folder"`: `path` (`$VARS` expanded), a folder of class sub-folders (`jaxtl.data.folder`). A missing
  folder named after the zip archive at `download_url` (`.../hymenoptera_data.zip` for `.../hymenoptera_data`)
  is fetched once and extracted atomically; offline, the error says which folder to create. A missing folder by
  any other name is an error: a mistyped path never downloads another dataset in its place.
- `source = "tfds"`: the tensorflow-datasets dataset `name` in `tfds_data_dir` (default `$JAXTL_DATA_DIR/tfds`),
  `jaxtl.data.tfds`.
- `source = "manifest"`: `path` is a `.csv` or `.jsonl` file listing image paths, labels and splits
  (`jaxtl.data.listing`); with `multi_label`, any number of labels an image (separated by `label_delimiter` in a
  CSV).
- `source = "hf"`: the Hugging Face dataset `name` (a Hub name, or a folder written by `save_to_disk`), its
  `hf_image_column` and `hf_label_column` (`jaxtl.data.hf`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from jaxtl.core import locations
from jaxtl.core.errors import ConfigError, DataError, MissingFileError
from jaxtl.core.paths import data_dir, resolve_path
from jaxtl.data.folder import folder_dataset, split_folders
from jaxtl.data.images import DEFAULT_MAX_PIXELS
from jaxtl.data.listing import listed_splits, listing_dataset
from jaxtl.data.split import ImageDataset
from jaxtl.data.tfds import tfds_dataset


@dataclass(frozen=True)
class DataSource:
    """A dataset to load: a folder (`path`, optionally fetched from `download_url`), a TFDS dataset (`name`), a
    manifest (`path`) or a Hugging Face dataset (`name`, its image and label columns);
    the splits a source lacks carved from train by `val_fraction` and `test_fraction` (seeded by `seed`); images
    turned upright by their EXIF orientation (`exif_orientation`)."""

    source: str = "folder"
    path: str = ""
    download_url: str = ""
    name: str = ""
    tfds_data_dir: str = ""
    tfds_download: bool = True
    hf_image_column: str = "image"
    hf_label_column: str = "label"
    multi_label: bool = False
    label_delimiter: str = " "
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    skip_bad_images: bool = False
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    exif_orientation: bool = True
    seed: int = 0

    def load(self) -> ImageDataset:
        """The dataset, every image checked (`jaxtl.data.folder`)."""
        if self.source == "tfds":
            root = str(resolve_path(self.tfds_data_dir) if self.tfds_data_dir else data_dir() / "tfds")
            return tfds_dataset(self.name, root, self.tfds_download, self.val_fraction, self.test_fraction,
                                self.max_image_pixels, self.exif_orientation)
        if self.source == "hf":
            from jaxtl.data.hf import hf_dataset  # the `datasets` library, only when asked for

            return hf_dataset(self.name, self.hf_image_column, self.hf_label_column, self.val_fraction,
                              self.test_fraction, self.seed, self.max_image_pixels, self.exif_orientation,
                              self.multi_label)
        if self.source == "manifest":
            return listing_dataset(locations.location(self.path), self.val_fraction, self.test_fraction, self.seed,
                                   self.skip_bad_images, self.max_image_pixels, self.exif_orientation,
                                   self.multi_label, self.label_delimiter)
        if self.multi_label:
            raise ConfigError(f"data.multi_label=True: data.source='{self.source}' gives one class an image; list "
                              "the images and their labels in a manifest (data.source='manifest') or a Hugging "
                              "Face dataset (data.source='hf')")
        if self.source != "folder":
            raise ConfigError(f"data.source='{self.source}': choose 'folder', 'tfds', 'manifest' or 'hf'")
        if not self.path:
            raise ConfigError("data.path is empty; set it to a folder of class sub-folders (or data.source='tfds')")
        path = locations.location(self.path)
        if locations.is_url(path):
            if not locations.is_dir(path):
                raise MissingFileError(f"dataset folder '{path}' does not exist; check data.path")
        elif not path.is_dir():
            fetch_missing(path, self.download_url)
        return folder_dataset(path, self.val_fraction, self.test_fraction, self.seed, self.skip_bad_images,
                              self.max_image_pixels, self.exif_orientation)

    def split_folders(self) -> dict[str, locations.Location]:
        """A folder source's split folders, if the folder is there (listing its top level only); a manifest's
        splits, each the manifest; a saved Hugging Face dataset's splits, each its folder."""
        if self.source == "manifest" and self.path:
            return {split: locations.location(self.path) for split in listed_splits(locations.location(self.path))}
        if self.source == "hf" and self.name and resolve_path(self.name).is_dir():
            from jaxtl.data.hf import saved_splits

            return {split: resolve_path(self.name) for split in saved_splits(resolve_path(self.name))}
        if self.source != "folder" or not self.path or not locations.is_dir(locations.location(self.path)):
            return {}
        return split_folders(locations.location(self.path))


def archive_folder(url: str) -> str:
    """The folder a dataset archive holds, by its name: `.../hymenoptera_data.zip` -> `hymenoptera_data`."""
    return Path(urllib.parse.urlparse(url).path).name.removesuffix(".zip")


def fetch_missing(path: Path, download_url: str) -> None:
    """Fetches a missing dataset folder from `download_url` when the archive is named after it; else an error."""
    if download_url and archive_folder(download_url) == path.name:
        fetch_archive(download_url, path)
        return
    hint = (f" (data.download_url fetches only a folder named '{archive_folder(download_url)}')" if download_url
            else "")
    raise MissingFileError(f"dataset folder '{path}' does not exist{hint}; check data.path, or create the folder "
                           "with one sub-folder of images per class")


def fetch_archive(url: str, target: Path) -> None:
    """Downloads a zip and extracts the folder it holds to `target`, never leaving a partial folder there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        archive = Path(tmp) / "archive.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise MissingFileError(
                f"dataset folder '{target}' is missing and {url} could not be downloaded ({e}). Download and unzip "
                f"it elsewhere so that '{target}' holds its class folders (or set JAXTL_DATA_DIR to a folder "
                f"containing '{target.name}')."
            ) from e
        with zipfile.ZipFile(archive) as z:
            z.extractall(Path(tmp) / "extracted")
        extracted = Path(tmp) / "extracted" / target.name
        if not extracted.is_dir():
            raise DataError(f"{url} does not contain a top-level '{target.name}' folder")
        os.replace(extracted, target)
