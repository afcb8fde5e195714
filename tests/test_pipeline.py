"""Input pipeline: deterministic batches whatever the threads, eval padding, per-process slices."""

import numpy as np

from jaxtl.data.folder import folder_dataset
from jaxtl.data.pipeline import Augment, batches
from jaxtl.data.preprocess import Preprocessing
from tests.conftest import make_image_folder

PREP = Preprocessing(input_size=24, crop_fraction=0.875)


def _split(tmp_path):
    make_image_folder(tmp_path, per_class=7)
    return folder_dataset(tmp_path, val_fraction=0.0).splits["train"]


def test_train_batches_are_deterministic_and_shuffled_per_epoch(tmp_path):
    split = _split(tmp_path)
    run = lambda epoch, workers: list(batches(split, PREP, 8, train=True, seed=1, epoch=epoch, workers=workers))
    a, b, c = run(0, 1), run(0, 4), run(1, 2)
    assert len(a) == 21 // 8  # incomplete last batch dropped
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
    assert not np.array_equal(a[0]["labels"], c[0]["labels"]) or not np.array_equal(a[0]["images"], c[0]["images"])
    assert a[0]["images"].shape == (8, 24, 24, 3) and a[0]["images"].dtype == np.float32


def test_eval_batches_cover_everything_once_with_padding_masked(tmp_path):
    split = _split(tmp_path)
    out = list(batches(split, PREP, 8, train=False))
    assert len(out) == 3
    assert [float(b["mask"].sum()) for b in out] == [8, 8, 5]
    labels = np.concatenate([b["labels"][b["mask"] > 0] for b in out])
    np.testing.assert_array_equal(labels, split.labels)


def test_processes_split_each_global_batch(tmp_path):
    split = _split(tmp_path)
    whole = list(batches(split, PREP, 8, train=True, seed=0, epoch=0))
    parts = [list(batches(split, PREP, 8, train=True, seed=0, epoch=0, process_index=i, process_count=2))
             for i in range(2)]
    for b, (p0, p1) in zip(whole, zip(*parts)):
        np.testing.assert_array_equal(np.concatenate([p0["images"], p1["images"]]), b["images"])


def test_augmentation_off_equals_eval_transform(tmp_path):
    split = _split(tmp_path)
    train = next(iter(batches(split, PREP, 8, train=True, augment=Augment(enabled=False))))
    order = np.random.default_rng([0, 0]).permutation(len(split))[:8]
    evals = next(iter(batches(split, PREP, len(split), train=False)))["images"][order]
    np.testing.assert_allclose(train["images"], evals)
