"""Where a run's images come from.

- `data.source = "folder"`: `data.path` (`$VARS` expanded). A missing folder with a `data.download_url` is
  fetched once (zip archive, extracted atomically); offline, the error says which folder to create.
- `data.source = "tfds"`: the tensorflow-datasets dataset `data.name` in `data.tfds_data_dir` (default
  `$JAXTL_DATA_DIR/tfds`), prepared once in array_record format (preparing needs TensorFlow and, for most
  datasets, the network; reading does not: images are decoded here with PIL). Its `train`, `validation`/`val`
  and `test` splits are used; a dataset with only `train` (tf_flowers) is split by `data.val_fraction` and
  `data.test_fraction` with TFDS's deterministic slicing.
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
import numpy as np

from jaxtl.data.folder import ImageDataset, Split, folder_dataset, split_folders
from jaxtl.errors import ConfigError, DataError, MissingFileError


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


def tfds_dataset(data: ml_collections.ConfigDict) -> ImageDataset:
    import tensorflow_datasets as tfds

    root = str(resolve_path(data.tfds_data_dir) if data.tfds_data_dir else data_dir() / "tfds")
    try:
        builder = tfds.builder(data.name, data_dir=root)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ConfigError(f"data.name='{data.name}' is not a tensorflow-datasets dataset ({e})") from e
    if not builder.is_prepared():
        if not data.tfds_download:
            raise MissingFileError(f"TFDS dataset '{data.name}' is not prepared in {root}; set "
                                    "data.tfds_download=True (needs network) or copy a prepared copy there")
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:  # network, missing TensorFlow, ...: all mean "could not prepare it here"
            raise MissingFileError(
                f"TFDS dataset '{data.name}' is not prepared in {root} and could not be prepared here ({e}). "
                f"Prepare it where there is network with `tfds build {data.name} --file_format=array_record "
                f"--data_dir=DIR` and copy DIR/{data.name} to {root}/{data.name}."
            ) from e
    image_key, label_key = builder.info.supervised_keys
    class_names = tuple(builder.info.features[label_key].names)
    available = set(builder.info.splits)
    specs = {"train": "train"}
    for split, aliases in (("val", ("validation", "val")), ("test", ("test",))):
        found = next((alias for alias in aliases if alias in available), None)
        if found:
            specs[split] = found
    # A split the dataset lacks is carved from the start of train with TFDS's deterministic slicing.
    carved = {k: v for k, v in (("val", data.val_fraction), ("test", data.test_fraction)) if k not in specs and v > 0}
    if carved:
        val, test = (round(100 * carved.get(k, 0.0)) for k in ("val", "test"))
        specs["train"] = f"train[{val + test}%:]"
        if val:
            specs["val"] = f"train[:{val}%]"
        if test:
            specs["test"] = f"train[{val}%:{val + test}%]"
    splits = {}
    for split, spec in specs.items():
        try:
            records = tfds.data_source(data.name, split=spec, data_dir=root,
                                       decoders={image_key: tfds.decode.SkipDecoding()})
        except Exception as e:
            raise DataError(f"cannot read TFDS '{data.name}' split '{spec}' from {root} ({e}); it must be "
                             "prepared with file_format=array_record") from e
        labels = np.asarray([records[i][label_key] for i in range(len(records))], np.int32)
        names = tuple(f"tfds:{data.name}/{spec}/{i}" for i in range(len(records)))
        splits[split] = Split(names, labels, records=records, image_key=image_key, max_pixels=data.max_image_pixels)
    splits = {split: splits[split] for split in ("train", "val", "test") if split in splits}
    return ImageDataset(class_names, splits, f"tfds:{data.name} ({root})", carved=carved)


def unread_fractions(data: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> list[str]:
    """`data.val_fraction`/`data.test_fraction` set to a non-default value for a folder that has that split's own
    folder (so the fraction is never read). Cheap: it only lists the folder's top level."""
    if data.source != "folder" or not data.path or not resolve_path(data.path).is_dir():
        return []
    folders = split_folders(resolve_path(data.path))
    return [f"data.{split}_fraction={data[f'{split}_fraction']!r}" for split in ("val", "test")
            if split in folders and data[f"{split}_fraction"] != defaults[f"{split}_fraction"]]


def load_dataset(data: ml_collections.ConfigDict, seed: int) -> ImageDataset:
    """The dataset `data` (a config's `data` section) describes."""
    if data.source == "tfds":
        return tfds_dataset(data)
    if data.source != "folder":
        raise ConfigError(f"data.source='{data.source}': choose 'folder' or 'tfds'")
    if not data.path:
        raise ConfigError("data.path is empty; set it to a folder of class sub-folders (or data.source='tfds')")
    path = resolve_path(data.path)
    if not path.is_dir() and data.download_url:
        fetch_archive(data.download_url, path)
    return folder_dataset(path, data.val_fraction, data.test_fraction, seed, data.skip_bad_images,
                          data.max_image_pixels)
