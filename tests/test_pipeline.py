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


def test_a_balanced_sampler_draws_classes_evenly_the_same_on_resume():
    """data.sampler='balanced': 24, 6 and 2 examples of three classes: an epoch draws each class 10 or 11 times of
    its 32 draws, a rare class's examples all and repeated (each repeat augmented anew), a common one's a different
    part each epoch; seeded by (seed, epoch), so a run resumed at any batch draws what the uninterrupted one did;
    on every process layout."""
    from jaxtl.data.pipeline import balanced_order, epoch_elements

    labels = np.repeat([0, 1, 2], [24, 6, 2])
    order = balanced_order(labels, seed=3, epoch=0)
    counts = np.bincount(labels[order], minlength=3)
    assert len(order) == 32 and counts.max() - counts.min() <= 1
    assert set(order[labels[order] == 2]) == {30, 31} and set(order[labels[order] == 1]) == set(range(24, 30))
    assert np.array_equal(order, balanced_order(labels, seed=3, epoch=0))
    assert set(order[labels[order] == 0]) != set(balanced_order(labels, seed=3, epoch=1)[
        labels[balanced_order(labels, seed=3, epoch=1)] == 0])
    whole = epoch_elements(32, 8, train=True, seed=3, epoch=0, labels=labels)
    assert np.array_equal(whole[:, 1], order[: len(whole)])
    assert np.array_equal(epoch_elements(32, 8, train=True, seed=3, epoch=0, labels=labels, start=2), whole[16:])
    repeats = whole[whole[:, 1] == 30]  # the rare class's first example, drawn 5 or 6 times: each time anew
    assert len(repeats) >= 5 and sorted(repeats[:, 2]) == list(range(len(repeats)))
    two = [epoch_elements(32, 8, train=True, seed=3, epoch=0, labels=labels, processes=ProcessSlice(i, 2))
           for i in range(2)]
    assert np.array_equal(np.concatenate([np.concatenate([two[0][b:b + 4], two[1][b:b + 4]])
                                          for b in range(0, 16, 4)]), whole)
    uniform = epoch_elements(32, 8, train=True, seed=3, epoch=0)
    assert not uniform[:, 2].any() and sorted(uniform[:, 1]) == list(range(32))  # each once, augmented as before
