"""Data sources: a prepared TFDS dataset read without TensorFlow, and a folder fetched from an archive."""

import functools
import zipfile

import numpy as np
import pytest

from jaxtl.config import base_config
from jaxtl.data.pipeline import batches
from jaxtl.data.preprocess import Preprocessing
from jaxtl.data.sources import fetch_archive, load_dataset
from jaxtl.errors import ConfigError
from tests.conftest import make_image_folder


@functools.cache
def _tiny_builder_class():
    """A 2-class image dataset builder, defined once (TFDS registers builders by class name)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class JaxtlTinyColours(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        SPLITS: dict = {}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, supervised_keys=("image", "label"),
                features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                                     "label": tfds.features.ClassLabel(names=["dark", "light"])}))

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(n) for name, n in self.SPLITS.items()}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((12, 18, 3), 40 if i % 2 == 0 else 220, np.uint8), "label": i % 2}

    return JaxtlTinyColours


def _tiny_tfds(data_dir, splits):
    """Prepares the tiny dataset with these splits in `data_dir` (preparing needs TensorFlow)."""
    builder_class = _tiny_builder_class()
    builder_class.SPLITS = splits
    builder_class(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "jaxtl_tiny_colours"


def _tfds_config(name, data_dir, **values):
    data = base_config().data
    data.source, data.name, data.tfds_data_dir = "tfds", name, str(data_dir)
    data.update(values)
    return data


def test_tfds_dataset_with_its_own_splits(tmp_path):
    name = _tiny_tfds(tmp_path, {"train": 10, "test": 4})
    dataset = load_dataset(_tfds_config(name, tmp_path, val_fraction=0.0), seed=0)
    assert dataset.class_names == ("dark", "light")
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 10, "test": 4}
    # without a val split of its own, val is carved from train (test is never used for any choice)
    carved = load_dataset(_tfds_config(name, tmp_path, val_fraction=0.2), seed=0)
    assert {k: len(v) for k, v in carved.splits.items()} == {"train": 8, "val": 2, "test": 4}
    assert carved.carved == {"val": 0.2}
    batch = next(iter(batches(dataset.splits["train"], Preprocessing(input_size=8), 4, train=False)))
    assert batch["images"].shape == (4, 8, 8, 3)
    brightness = batch["images"].mean(axis=(1, 2, 3))  # uint8: dark 40, light 220
    np.testing.assert_array_equal(brightness > 128, batch["labels"] == 1)  # labels travel with their images
    # TFDS records go through the same pipeline, worker processes included
    again = next(iter(batches(dataset.splits["train"], Preprocessing(input_size=8), 4, train=False, workers=2)))
    np.testing.assert_array_equal(np.asarray(again["images"]), batch["images"])
    assert sorted(dataset.splits["train"].labels.tolist()) == [0] * 5 + [1] * 5


def test_tfds_train_only_is_sliced(tmp_path):
    name = _tiny_tfds(tmp_path, {"train": 20})
    dataset = load_dataset(_tfds_config(name, tmp_path, val_fraction=0.2, test_fraction=0.1), seed=0)
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 14, "val": 4, "test": 2}


def test_tfds_not_prepared_and_unknown(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match=r"'mnist' is not prepared in .*tfds_download=True"):
        load_dataset(_tfds_config("mnist", tmp_path, tfds_download=False), seed=0)
    with pytest.raises(ConfigError, match="data.name='no_such_dataset_xyz' is not a tensorflow-datasets dataset"):
        load_dataset(_tfds_config("no_such_dataset_xyz", tmp_path), seed=0)


def test_missing_folder_is_fetched_from_its_archive(tmp_path):
    source = make_image_folder(tmp_path / "src" / "shapes", classes=("red", "blue"), per_class=2)
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in source.rglob("*.png"):
            z.write(path, path.relative_to(source.parent))
    target = tmp_path / "data" / "shapes"
    data = base_config().data
    data.path, data.download_url = str(target), archive.as_uri()
    dataset = load_dataset(data, seed=0)
    assert dataset.class_names == ("blue", "red") and sum(len(s) for s in dataset.splits.values()) == 4


def test_offline_fetch_says_where_to_put_the_folder(tmp_path):
    target = tmp_path / "data" / "hymenoptera_data"
    with pytest.raises(FileNotFoundError, match=r"holds its class folders .*JAXTL_DATA_DIR"):
        fetch_archive("http://127.0.0.1:9/hymenoptera_data.zip", target)
    assert not target.exists() and list(target.parent.iterdir()) == []
