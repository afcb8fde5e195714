"""The decoded-image cache: evaluation exactly as from the files, training from windows the device crops, keyed by
content, written atomically, prepared again when damaged."""

import numpy as np
import pytest
from PIL import Image

from jaxtl.core import atomic as atomic_module
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.data.decoded import decoded_entry, decoded_split
from jaxtl.data.folder import folder_dataset
from jaxtl.data.pipeline import Augment, batches
from tests.conftest import make_image_folder

PREP = Preprocessing(input_size=24, crop_fraction=0.875, interpolation="bicubic")


@pytest.fixture()
def split(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=5, size=(61, 37), textured=True)
    # a JPEG too: the cache stores what the files path decodes (JPEG draft mode included)
    Image.new("RGB", (300, 200), (10, 140, 220)).save(root / "blue" / "big.jpg", quality=90)
    return folder_dataset(root, val_fraction=0.0).splits["train"]


def test_evaluation_from_the_cache_is_evaluation_from_the_files(split, tmp_path):
    cached = decoded_split(split, PREP, tmp_path / "cache")
    direct = np.concatenate([b["images"] for b in batches(split, PREP, 4, train=False)])
    from_cache = np.concatenate([b["images"] for b in batches(cached, PREP, 4, train=False)])
    np.testing.assert_array_equal(from_cache, direct)
    stored = cached.pixels(0)
    assert min(stored.shape[:2]) == PREP.resize_size and stored.dtype == np.uint8


def test_training_from_the_cache_sends_windows_and_boxes(split, tmp_path):
    cached = decoded_split(split, PREP, tmp_path / "cache")
    batch = next(iter(batches(cached, PREP, 8, train=True, augment=Augment())))
    side = batch["images"].shape[1]
    assert side == int(np.ceil(4 / 3 * PREP.resize_size)) and batch["boxes"].shape == (8, 4)
    top, left, height, width = batch["boxes"].T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= side).all() and (left + width <= side).all()
    again = next(iter(batches(cached, PREP, 8, train=True, augment=Augment(), workers=2)))
    np.testing.assert_array_equal(np.asarray(again["boxes"]), batch["boxes"])


def test_a_training_cache_at_the_input_size_is_smaller_and_crops_within_it(split, tmp_path):
    """`data.decoded_cache_side`: the train split stored at the training resolution (a size cap), a separate entry;
    the windows shipped to the device shrink with it, and the boxes stay inside them."""
    full, capped = decoded_split(split, PREP, tmp_path / "cache"), decoded_split(split, PREP, tmp_path / "cache",
                                                                                  side=PREP.input_size)
    assert capped.directory != full.directory
    assert min(capped.pixels(0).shape[:2]) == PREP.input_size < min(full.pixels(0).shape[:2])
    sizes = [(d / "pixels.bin").stat().st_size for d in (full.directory, capped.directory)]
    assert sizes[1] < 0.8 * sizes[0]
    batch = next(iter(batches(capped, PREP, 8, train=True, augment=Augment())))
    side = batch["images"].shape[1]
    assert side == int(np.ceil(4 / 3 * PREP.input_size))
    top, left, height, width = batch["boxes"].T
    assert (top + height <= side).all() and (left + width <= side).all() and (height > 0).all()


def test_key_follows_content_and_preprocessing(split, tmp_path):
    base = decoded_entry(split, PREP, tmp_path).path
    assert decoded_entry(split, Preprocessing(input_size=32), tmp_path).path != base
    image = np.asarray(Image.open(split.files[2])).copy()
    image[0, 0] = 255 - image[0, 0]
    Image.fromarray(image).save(split.files[2])
    assert decoded_entry(split, PREP, tmp_path).path != base


def test_an_interrupted_or_damaged_entry_is_never_read(split, tmp_path, monkeypatch):
    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_module, "publish", dies)
    with pytest.raises(KeyboardInterrupt):
        decoded_split(split, PREP, tmp_path)
    directory = decoded_entry(split, PREP, tmp_path).path
    assert not list(directory.glob("*.bin")) and not list(directory.glob(".*.tmp"))
    monkeypatch.undo()
    cached = decoded_split(split, PREP, tmp_path)
    good = np.asarray(cached.pixels(len(split) - 1)).copy()
    data = (directory / "pixels.bin").read_bytes()
    (directory / "pixels.bin").write_bytes(data[: len(data) // 2])  # a copy cut short
    again = decoded_split(split, PREP, tmp_path)
    np.testing.assert_array_equal(again.pixels(len(split) - 1), good)
