"""Cached features of one split as a dataset: rows read from memory-mapped arrays, and batches for the train and
eval steps (`jaxtl.train.steps.FEATURES`), deterministic and sliced per process like the image pipeline's."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from jaxtl.core.errors import DataError
from jaxtl.core.processes import ProcessSlice
from jaxtl.data.pipeline import batch_indices
from jaxtl.data.split import padded_labels


class FeatureSet:
    """The pooled features of one split, from one or more layers (memory-mapped arrays), concatenated on read in
    the order given (the order of the head's `head_layers`); or one layer's full `(N, H, W, C)` maps (the map
    cache)."""

    def __init__(self, arrays: Sequence[np.ndarray], labels: np.ndarray):
        self.arrays, self.labels = list(arrays), np.asarray(labels)
        maps = len(self.arrays) == 1 and self.arrays[0].ndim == 4
        if any((a.ndim != 2 and not maps) or len(a) != len(self.labels) for a in self.arrays):
            raise DataError(f"features must be pooled (N, C) arrays, or one (N, H, W, C) array of maps, with "
                            f"N={len(self.labels)}, got {[a.shape for a in self.arrays]}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return sum(a.shape[-1] for a in self.arrays)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (*self.arrays[0].shape[1:-1], self.dim)

    def rows(self, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """`(len(index), *row_shape)` float32; row reads from the memory maps go in file order."""
        if isinstance(index, slice):
            return np.concatenate([np.asarray(a[index], np.float32) for a in self.arrays], axis=-1)
        order = np.argsort(index, kind="stable")
        out = np.empty((len(index), *self.row_shape), np.float32)
        out[order] = np.concatenate([np.asarray(a[index[order]], np.float32) for a in self.arrays], axis=-1)
        return out


def feature_batches(
    features: FeatureSet,
    global_batch: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    processes: ProcessSlice | None = None,
    start: int = 0,
    flip: bool = False,
    balanced: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of each global batch: `features` (B, D) (or maps), `labels`, `mask`. Training shuffles
    by `(seed, epoch)` and drops the incomplete last batch; evaluation keeps order and pads with `mask` 0. `start`
    skips the epoch's first batches; `processes`: whose slice (default: this process's). `flip` (training, maps):
    a `flip` flag per example, drawn from `(seed, epoch)` and the example, for the step to mirror its maps."""
    processes = processes or ProcessSlice.current()
    local = processes.local(global_batch)
    flips = np.random.default_rng([seed, epoch, 1]).random(len(features)) < 0.5 if flip and train else None
    labels = features.labels if balanced and train else None  # classes drawn evenly (`balanced_order`)
    for index in list(batch_indices(len(features), global_batch, train=train, seed=seed, epoch=epoch,
                                    processes=processes, labels=labels))[start:]:
        pad = local - len(index)
        rows = features.rows(index)
        batch = {"features": np.pad(rows, ((0, pad),) + ((0, 0),) * (rows.ndim - 1)),
                 "labels": padded_labels(features.labels[index], pad),
                 "mask": np.pad(np.ones(len(index), np.float32), (0, pad))}
        if flips is not None:
            batch["flip"] = np.pad(flips[index], (0, pad)).astype(np.uint8)
        yield batch
