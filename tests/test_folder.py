"""Image-folder datasets: split folders, seeded stratified splits, unreadable files, empty classes, broken
symlinks, non-ASCII names."""

import numpy as np
import pytest

from jaxtl.core.errors import DataError, ImageReadError, MissingFileError
from jaxtl.data.folder import folder_dataset
from tests.conftest import make_image_folder


def test_split_folders_and_class_names(tmp_path):
    make_image_folder(tmp_path, classes=("red", "blue"), per_class=3, splits=("train", "val"))
    ds = folder_dataset(tmp_path)
    assert ds.class_names == ("blue", "red")
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 6, "val": 6}
    assert all(f.parent.name == ds.class_names[label] for f, label in zip(ds.splits["val"].files, ds.splits["val"].labels))


def test_stratified_split_is_deterministic_and_disjoint(tmp_path):
    make_image_folder(tmp_path, per_class=10)
    a = folder_dataset(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    b = folder_dataset(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    c = folder_dataset(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=4)
    assert a.splits["val"].files == b.splits["val"].files != c.splits["val"].files
    assert np.bincount(a.splits["val"].labels).tolist() == [2, 2, 2]  # stratified
    assert np.bincount(a.splits["test"].labels).tolist() == [1, 1, 1]
    all_files = [f for s in a.splits.values() for f in s.files]
    assert len(all_files) == len(set(all_files)) == 30


def test_hymenoptera_layout(data_dir):
    ds = folder_dataset(data_dir / "hymenoptera_data")
    assert ds.class_names == ("ants", "bees")
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 245, "val": 153}


def test_unreadable_image_is_an_error_or_skipped(tmp_path):
    make_image_folder(tmp_path, classes=("red", "blue"), per_class=3)
    bad = tmp_path / "red" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ImageReadError, match=r"broken.jpg.*skip_bad_images"):
        folder_dataset(tmp_path)
    ds = folder_dataset(tmp_path, skip_bad_images=True)
    assert ds.skipped == (bad,)
    assert sum(len(s) for s in ds.splits.values()) == 6


def test_folder_errors(tmp_path):
    with pytest.raises(MissingFileError, match="nowhere"):
        folder_dataset(tmp_path / "nowhere")
    make_image_folder(tmp_path / "one", classes=("red",), per_class=2)
    with pytest.raises(DataError, match="need at least 2"):
        folder_dataset(tmp_path / "one")
    make_image_folder(tmp_path / "mixed", classes=("red", "blue"), per_class=2, splits=("train",))
    make_image_folder(tmp_path / "mixed", classes=("red", "grey"), per_class=2, splits=("val",))
    with pytest.raises(DataError, match=r"\['grey'\] that the train split does not have"):
        folder_dataset(tmp_path / "mixed")


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    make_image_folder(tmp_path, classes=("red", "blue"), per_class=3)
    (tmp_path / "green").mkdir()
    (tmp_path / "green" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder '.*green' holds no images"):
        folder_dataset(tmp_path)


def test_class_left_without_readable_images_is_an_error(tmp_path):
    make_image_folder(tmp_path, classes=("red", "blue"), per_class=3)
    for path in (tmp_path / "blue").iterdir():
        path.write_bytes(b"")
    with pytest.raises(DataError, match=r"class\(es\) \['blue'\] have no readable training images"):
        folder_dataset(tmp_path, val_fraction=0.0, skip_bad_images=True)


def test_broken_symlink_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    make_image_folder(tmp_path, classes=("red", "blue"), per_class=3)
    (tmp_path / "red" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "blue" / "alias.png").symlink_to(tmp_path / "blue" / "000.png")  # a good link is followed
    ds = folder_dataset(tmp_path, val_fraction=0.0)
    assert len(ds.splits["train"]) == 7
    assert "broken symlink" in caplog.text and "gone.png" in caplog.text


def test_non_ascii_file_and_class_names(tmp_path):
    make_image_folder(tmp_path, classes=("red", "blue"), per_class=2)
    (tmp_path / "red").rename(tmp_path / "красный")
    (tmp_path / "blue" / "000.png").rename(tmp_path / "blue" / "蜂_ß.png")
    ds = folder_dataset(tmp_path, val_fraction=0.0)
    assert ds.class_names == ("blue", "красный")
    assert any(f.name == "蜂_ß.png" for f in ds.splits["train"].files)
    assert ds.splits["train"].load(0, 64).mode == "RGB"


def test_a_split_without_its_folder_is_carved_from_train(tmp_path):
    make_image_folder(tmp_path, per_class=10, splits=("train", "test"))
    ds = folder_dataset(tmp_path, val_fraction=0.2)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 24, "val": 6, "test": 30}
    assert ds.carved == {"val": 0.2}
    assert not set(ds.splits["val"].files) & set(ds.splits["test"].files)
