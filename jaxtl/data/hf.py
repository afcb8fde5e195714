"""Hugging Face datasets (`data.source="hf"`): `name` is a Hub dataset name (through the `datasets` library, from
its cache; offline with `HF_DATASETS_OFFLINE=1`) or a folder written by `Dataset.save_to_disk` /
`DatasetDict.save_to_disk`. The image column (`data.hf_image_column`, default `image`: an `Image` feature, or bytes
or a file path) is read undecoded and decoded here, as for every other source; the label column
(`data.hf_label_column`, default `label`) names the classes by its `ClassLabel` names (strings: sorted; integers
without names: "0".."K-1"); with `multi_label` it holds a list of labels a row (a `Sequence`/`List` of
`ClassLabel`, of names or of indices), made multi-hot rows. Splits are the dataset's `train`, `validation`/`val`
and `test`; those it lacks are carved from train with the val and test fractions (seeded, stratified), as for a
folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxtl.core.errors import ConfigError, DataError, MissingFileError
from jaxtl.data.split import ImageDataset, Split, fractions_to_carve, multi_hot, stratified_split

SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


class HFImages:
    """A `datasets.Dataset`'s image column as the records a `Split` reads: item `i` is `{"image": bytes}`, the
    encoded file as stored (an `Image` feature's bytes, or the file at its path). Picklable, for worker processes."""

    def __init__(self, dataset, column: str):
        from datasets import Image as ImageFeature

        feature = dataset.features[column]
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        value = self.dataset[int(index)][self.column]
        if isinstance(value, dict):  # an undecoded Image: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str):
            value = Path(value).read_bytes()
        if not isinstance(value, bytes):
            raise DataError(f"hf: row {index} of column '{self.column}' is a {type(value).__name__}, not an encoded "
                            "image; set data.hf_image_column to the column of images")
        return {"image": value}


def saved_splits(path: Path) -> set[str]:
    """The splits (jaxtl's names) of a `DatasetDict` saved at `path`, from its `dataset_dict.json` alone (a
    `Dataset` saved alone: train); empty when `path` holds neither."""
    listing = path / "dataset_dict.json"
    if listing.is_file():
        try:
            names = set(json.loads(listing.read_text()).get("splits", ()))
        except (ValueError, AttributeError):
            return set()
        return {ours for ours, aliases in SPLIT_NAMES.items() if names & set(aliases)}
    return {"train"} if (path / "dataset_info.json").is_file() else set()


def _load(name: str):
    import datasets

    path = Path(name).expanduser()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(name)
    except FileNotFoundError as e:
        raise MissingFileError(f"data.name='{name}': no dataset saved there and none of that name in the Hugging "
                               f"Face cache ({e}); give a folder written by save_to_disk or a Hub dataset name "
                               "(online, or cached for HF_DATASETS_OFFLINE=1)") from e
    except (ConnectionError, ValueError) as e:
        raise MissingFileError(f"data.name='{name}' could not be loaded ({e}); offline, it must be in the Hugging "
                               "Face cache (HF_HOME) or a folder written by save_to_disk") from e
    if isinstance(loaded, datasets.Dataset):  # one split saved alone: it is train
        return {"train": loaded}
    return dict(loaded)


def _class_names(feature, values: list) -> tuple[tuple[str, ...], np.ndarray]:
    names = getattr(feature, "names", None)
    if names:
        return tuple(names), np.asarray(values, np.int32)
    if all(isinstance(v, str) for v in values):
        classes = tuple(sorted(set(values)))
        index = {name: i for i, name in enumerate(classes)}
        return classes, np.asarray([index[v] for v in values], np.int32)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in values):
        return tuple(str(i) for i in range(max(values) + 1)), np.asarray(values, np.int32)
    raise DataError("hf: the label column holds neither class indices nor names; set data.hf_label_column to the "
                    "column of labels")


def _label_lists(feature, values: list) -> tuple[object, list, list[int]]:
    """A column of label lists as one column of labels (`_class_names` reads it): the lists' feature, their values
    in order, and each row's count."""
    if not all(isinstance(v, (list, tuple)) for v in values):
        raise DataError("hf: data.multi_label=True, but the label column holds one label a row; give a column of "
                        "lists of labels (a Sequence of ClassLabel), or set data.multi_label=False")
    return getattr(feature, "feature", None), [v for row in values for v in row], [len(row) for row in values]


def hf_dataset(name: str, image_column: str, label_column: str, val_fraction: float, test_fraction: float,
               seed: int, max_pixels: int, exif: bool = True, multi_label: bool = False) -> ImageDataset:
    """The Hugging Face dataset `name` (a Hub name or a `save_to_disk` folder) as an `ImageDataset`."""
    if not name:
        raise ConfigError("data.name is empty; set it to a Hugging Face dataset name or a folder written by "
                          "Dataset.save_to_disk")
    available = _load(name)
    found = {split: next((available[a] for a in aliases if a in available), None)
             for split, aliases in SPLIT_NAMES.items()}
    if found["train"] is None:
        raise DataError(f"hf dataset '{name}' has no train split (it has {', '.join(sorted(available))}); "
                        "rename the split to train")
    for split in (s for s in found.values() if s is not None):
        for column, key in ((image_column, "data.hf_image_column"), (label_column, "data.hf_label_column")):
            if column not in split.column_names:
                raise ConfigError(f"{key}='{column}' is not a column of hf dataset '{name}' (its columns: "
                                  f"{', '.join(split.column_names)})")
    given = {split: dataset for split, dataset in found.items() if dataset is not None}
    class_names, index, splits = None, {}, {}
    for split, dataset in given.items():  # train first: its classes are the run's
        feature, values = dataset.features[label_column], dataset[label_column]
        if multi_label:  # the lists' labels as one column, each row's made multi-hot below
            feature, values, lengths = _label_lists(feature, values)
        names, labels = _class_names(feature, values)
        if class_names is None:
            class_names, index = names, {n: i for i, n in enumerate(names)}
        elif names != class_names:  # another split's own names (a subset of string labels): train's by name
            unknown = sorted(set(names) - set(index))
            if unknown:
                raise DataError(f"hf dataset '{name}' split '{split}' has labels train lacks: {unknown[:5]}")
            labels = np.asarray([index[names[i]] for i in labels], np.int32)
        if multi_label:
            labels = multi_hot(np.split(labels, np.cumsum(lengths)[:-1]), len(class_names))
        files = tuple(f"hf:{name}/{split}/{i}" for i in range(len(dataset)))
        splits[split] = Split(files, labels, records=HFImages(dataset, image_column), image_key="image",
                              max_pixels=max_pixels, exif=exif)
    carved = fractions_to_carve(given, val_fraction, test_fraction)
    if carved:
        whole = splits["train"]
        for part, index in stratified_split(whole.labels, carved, seed).items():
            splits[part] = whole.subset(index)
    splits = {split: splits[split] for split in ("train", "val", "test") if split in splits}
    return ImageDataset(class_names, splits, f"hf:{name}", carved=carved)
