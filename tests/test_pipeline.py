"""Input pipeline: uint8 batches, deterministic whatever the threads or worker processes, eval padding,
per-process slices, resuming mid-epoch, and crops the device resizes for the decoded-image cache."""

import numpy as np
import pytest
from PIL import Image

from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.processes import ProcessSlice
from jaxtl.data.folder import folder_dataset
from jaxtl.data.pipeline import Augment, batches, crop_resize_on_device, crop_window, flip_on_device
from jaxtl.data.preprocess import eval_transform, normalize
from tests.conftest import make_image_folder

PREP = Preprocessing(input_size=24, crop_fraction=0.875)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("colours"), per_class=7)
    return folder_dataset(root, val_fraction=0.0).splits["train"]


def _images(batch):
    """What the step feeds the model: mirrored where `flip` says, normalised."""
    return normalize(flip_on_device(batch["images"], batch["flip"]), PREP)


def test_train_batches_are_uint8_deterministic_and_shuffled_per_epoch(split):
    run = lambda epoch, workers: list(batches(split, PREP, 8, train=True, seed=1, epoch=epoch, workers=workers))  # noqa
    threads, processes, other_epoch = run(0, 0), run(0, 2), run(1, 0)
    assert len(threads) == 21 // 8  # incomplete last batch dropped
    assert threads[0]["images"].shape == (8, 24, 24, 3) and threads[0]["images"].dtype == np.uint8
    for x, y in zip(threads, processes):  # two worker processes decode exactly what the reader threads do
        for key in ("images", "labels", "flip", "mask"):
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]))
    assert not np.array_equal(threads[0]["labels"], other_epoch[0]["labels"]) or not np.array_equal(
        threads[0]["images"], other_epoch[0]["images"])
    assert 0 < sum(b["flip"].sum() for b in threads) < 16  # about half mirrored


def test_eval_batches_cover_everything_once_with_padding_masked(split):
    out = list(batches(split, PREP, 8, train=False))
    assert [float(b["mask"].sum()) for b in out] == [8, 8, 5] and not any(b["flip"].any() for b in out)
    labels = np.concatenate([b["labels"][b["mask"] > 0] for b in out])
    np.testing.assert_array_equal(labels, split.labels)
    images = np.concatenate([_images(b)[b["mask"] > 0] for b in out])
    np.testing.assert_allclose(images[3], eval_transform(split.files[3], PREP), atol=1e-6)


def test_processes_split_each_global_batch_and_a_resumed_epoch_skips_batches(split):
    whole = list(batches(split, PREP, 8, train=True, seed=0, epoch=0, epochs=2))
    parts = [list(batches(split, PREP, 8, train=True, seed=0, epoch=0, processes=ProcessSlice(i, 2), epochs=2))
             for i in range(2)]
    assert len(whole) == 4  # two epochs of two batches from one stream
    for b, (p0, p1) in zip(whole, zip(*parts)):
        np.testing.assert_array_equal(np.concatenate([p0["images"], p1["images"]]), b["images"])
    resumed = list(batches(split, PREP, 8, train=True, seed=0, epoch=0, start=1, epochs=2))
    for b, r in zip(whole[1:], resumed):
        np.testing.assert_array_equal(b["images"], r["images"])


def test_augmentation_off_equals_eval_transform(split):
    train = next(iter(batches(split, PREP, 8, train=True, augment=Augment(enabled=False))))
    order = np.random.default_rng([0, 0]).permutation(len(split))[:8]
    evals = next(iter(batches(split, PREP, len(split), train=False)))["images"][order]
    np.testing.assert_array_equal(train["images"], evals)


@pytest.mark.parametrize("box", [(10, 20, 210, 170), (100, 50, 160, 100), (0, 0, 341, 256), (200, 100, 341, 256)])
def test_device_crops_match_the_host_s_to_one_level(box):
    """The decoded-image cache's crops, resized on the device, against PIL resizing the same box on the host."""
    import jax.numpy as jnp

    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(12, 16, 3) * 255).astype(np.uint8)).resize((341, 256), Image.BICUBIC)
    window = np.zeros((342, 342, 3), np.uint8)
    placed = crop_window(np.asarray(image), box, window)
    device = np.asarray(crop_resize_on_device(jnp.asarray(window[None]), jnp.asarray(placed[None]), 224, "bicubic"))
    host = np.asarray(image.resize((224, 224), Image.BICUBIC, box=box), np.float32)
    assert np.abs(device[0] - host).max() <= 1.0
