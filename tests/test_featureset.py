"""Cached features as a dataset: rows from memory maps, deterministic per-process batches like the image pipeline's."""

import numpy as np
import pytest

from jaxtl.core.errors import DataError
from jaxtl.core.processes import ProcessSlice
from jaxtl.data.pipeline import batch_indices
from jaxtl.features.featureset import FeatureSet, feature_batches


def test_feature_set_concatenates_layers_and_reads_any_order(tmp_path):
    a, b = np.arange(12, dtype=np.float32).reshape(6, 2), -np.arange(18, dtype=np.float32).reshape(6, 3)
    np.save(tmp_path / "a.npy", a)
    features = FeatureSet([np.load(tmp_path / "a.npy", mmap_mode="r"), b], np.arange(6))
    index = np.array([4, 1, 5])
    np.testing.assert_array_equal(features.rows(index), np.concatenate([a, b], 1)[index])
    assert features.dim == 5 and len(features) == 6
    with pytest.raises(DataError, match="pooled"):  # maps come alone, never beside pooled layers
        FeatureSet([np.zeros((6, 2, 2, 1)), a], np.arange(6))
    with pytest.raises(DataError, match="pooled"):
        FeatureSet([np.zeros((6, 2, 2))], np.arange(6))
    maps = np.arange(48, dtype=np.float32).reshape(6, 2, 2, 2)  # one layer's maps (the map cache)
    np.testing.assert_array_equal(FeatureSet([maps], np.arange(6)).rows(index), maps[index])


def test_batches_shuffle_per_epoch_pad_eval_and_split_over_processes():
    features = FeatureSet([np.arange(22, dtype=np.float32)[:, None]], np.arange(22) % 3)
    train = list(feature_batches(features, 8, train=True, seed=1, epoch=0))
    assert len(train) == 2 and all(b["mask"].sum() == 8 for b in train)  # the incomplete batch is dropped
    rows = np.concatenate([b["features"][:, 0] for b in train]).astype(int)
    assert len(set(rows)) == 16 and rows.tolist() != sorted(rows.tolist())
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in train]), rows % 3)  # labels travel along
    other = np.concatenate([b["features"][:, 0] for b in feature_batches(features, 8, train=True, seed=1, epoch=1)])
    assert other.tolist() != rows.tolist()
    evaluation = list(feature_batches(features, 8, train=False))
    assert [b["mask"].sum() for b in evaluation] == [8, 8, 6]
    parts = [list(feature_batches(features, 8, train=True, seed=1, epoch=0, processes=ProcessSlice(i, 2)))
             for i in range(2)]
    for whole, (p0, p1) in zip(train, zip(*parts)):
        np.testing.assert_array_equal(np.concatenate([p0["features"], p1["features"]]), whole["features"])


def test_batch_indices_are_those_of_the_image_pipeline():
    assert [i.tolist() for i in batch_indices(5, 2, train=False)] == [[0, 1], [2, 3], [4]]
    train = [i.tolist() for i in batch_indices(5, 2, train=True, seed=0, epoch=0)]
    assert len(train) == 2 and sorted(sum(train, [])) == sorted(np.random.default_rng([0, 0]).permutation(5)[:4])
