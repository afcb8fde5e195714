"""tensorflow-datasets datasets: `name` in `data_dir` (default `$JAXTL_DATA_DIR/tfds`), prepared once in
array_record format (preparing needs TensorFlow and, for most datasets, the network; reading does not: images are
decoded here with PIL). Its `train`, `validation`/`val` and `test` splits are used; a dataset with only `train`
(tf_flowers) is split by the val and test fractions with TFDS's deterministic slicing."""

from __future__ import annotations

import numpy as np

from jaxtl.core.errors import ConfigError, DataError, MissingFileError
from jaxtl.data.split import ImageDataset, Split, fractions_to_carve


def tfds_dataset(name: str, root: str, download: bool, val_fraction: float, test_fraction: float,
                 max_pixels: int, exif: bool = True) -> ImageDataset:
    """The prepared (or, with `download`, prepared now) TFDS dataset `name` under `root`."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=root)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ConfigError(f"data.name='{name}' is not a tensorflow-datasets dataset ({e})") from e
    if not builder.is_prepared():
        if not download:
            raise MissingFileError(f"TFDS dataset '{name}' is not prepared in {root}; set "
                                    "data.tfds_download=True (needs network) or copy a prepared copy there")
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:  # network, missing TensorFlow, ...: all mean "could not prepare it here"
            raise MissingFileError(
                f"TFDS dataset '{name}' is not prepared in {root} and could not be prepared here ({e}). "
                f"Prepare it where there is network with `tfds build {name} --file_format=array_record "
                f"--data_dir=DIR` and copy DIR/{name} to {root}/{name}."
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
    carved = fractions_to_carve(specs, val_fraction, test_fraction)
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
            records = tfds.data_source(name, split=spec, data_dir=root,
                                       decoders={image_key: tfds.decode.SkipDecoding()})
        except Exception as e:
            raise DataError(f"cannot read TFDS '{name}' split '{spec}' from {root} ({e}); it must be "
                             "prepared with file_format=array_record") from e
        labels = np.asarray([records[i][label_key] for i in range(len(records))], np.int32)
        names = tuple(f"tfds:{name}/{spec}/{i}" for i in range(len(records)))
        splits[split] = Split(names, labels, records=records, image_key=image_key, max_pixels=max_pixels,
                              exif=exif)
    splits = {split: splits[split] for split in ("train", "val", "test") if split in splits}
    return ImageDataset(class_names, splits, f"tfds:{name} ({root})", carved=carved)
