"""Data sources: a prepared TFDS dataset read without TensorFlow, and a folder fetched from an archive."""

import functools
import zipfile

import numpy as np
import pytest

from jaxtl.core.errors import ConfigError
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.data.pipeline import batches
from jaxtl.data.sources import DataSource, fetch_archive
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


def _tfds_source(name, data_dir, **values):
    return DataSource(source="tfds", name=name, tfds_data_dir=str(data_dir), **values)


def test_tfds_dataset_with_its_own_splits(tmp_path):
    name = _tiny_tfds(tmp_path, {"train": 10, "test": 4})
    dataset = _tfds_source(name, tmp_path, val_fraction=0.0).load()
    assert dataset.class_names == ("dark", "light")
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 10, "test": 4}
    # without a val split of its own, val is carved from train (test is never used for any choice)
    carved = _tfds_source(name, tmp_path, val_fraction=0.2).load()
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
    dataset = _tfds_source(name, tmp_path, val_fraction=0.2, test_fraction=0.1).load()
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 14, "val": 4, "test": 2}


def test_tfds_not_prepared_and_unknown(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match=r"'mnist' is not prepared in .*tfds_download=True"):
        _tfds_source("mnist", tmp_path, tfds_download=False).load()
    with pytest.raises(ConfigError, match="data.name='no_such_dataset_xyz' is not a tensorflow-datasets dataset"):
        _tfds_source("no_such_dataset_xyz", tmp_path).load()


def test_missing_folder_is_fetched_from_its_archive(tmp_path):
    source = make_image_folder(tmp_path / "src" / "shapes", classes=("red", "blue"), per_class=2)
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in source.rglob("*.png"):
            z.write(path, path.relative_to(source.parent))
    target = tmp_path / "data" / "shapes"
    dataset = DataSource(path=str(target), download_url=archive.as_uri()).load()
    assert dataset.class_names == ("blue", "red") and sum(len(s) for s in dataset.splits.values()) == 4


def test_a_mistyped_path_is_never_filled_from_the_archive(tmp_path):
    """The archive is fetched only into a folder named after it: a mistyped path is an error naming it."""
    archive_url = (tmp_path / "shapes.zip").as_uri()  # never read: the names do not match
    for mistyped in ("shapez", "my_data"):
        with pytest.raises(FileNotFoundError, match=rf"'{tmp_path / mistyped}' does not exist .*only a folder named "
                                                     r"'shapes'.*check data.path"):
            DataSource(path=str(tmp_path / mistyped), download_url=archive_url).load()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_offline_fetch_says_where_to_put_the_folder(tmp_path):
    target = tmp_path / "data" / "hymenoptera_data"
    with pytest.raises(FileNotFoundError, match=r"holds its class folders .*JAXTL_DATA_DIR"):
        fetch_archive("http://127.0.0.1:9/hymenoptera_data.zip", target)
    assert not target.exists() and list(target.parent.iterdir()) == []
