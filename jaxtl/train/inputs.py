"""Where a run's batches come from: images through the input pipeline, or cached features. The loop asks a
source for the batches of an epoch and of an evaluation split; both are deterministic (order and augmentation
depend only on seed, epoch and example), sliced per process, and can start mid-epoch (a resumed run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from jaxtl.core.preprocessing import Preprocessing
from jaxtl.data.pipeline import Augment, batches, num_batches
from jaxtl.data.split import ImageDataset
from jaxtl.features.featureset import FeatureSet, feature_batches
from jaxtl.train.steps import FEATURES, Inputs, image_inputs


@dataclass
class ImageSource:
    """Decoded, augmented image batches of a dataset's splits."""

    dataset: ImageDataset
    prep: Preprocessing
    augment: Augment
    batch_size: int
    seed: int
    workers: int = 0
    balanced: bool = False  # training draws classes evenly (`data.sampler="balanced"`)

    @property
    def inputs(self) -> Inputs:
        return image_inputs(self.prep, self.augment.policy)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.dataset.splits)

    def count(self, split: str) -> int:
        return len(self.dataset.splits[split])

    def steps_per_epoch(self) -> int:
        return num_batches(self.dataset.splits["train"], self.batch_size, True)

    def eval_steps(self, split: str) -> int:
        return num_batches(self.dataset.splits[split], self.batch_size, False)

    def train_batches(self, epoch: int, start: int = 0, epochs: int = 1) -> Iterator[dict]:
        """The batches of `epochs` epochs from batch `start` of `epoch` on, from one stream (one start of the
        decoding workers)."""
        return batches(self.dataset.splits["train"], self.prep, self.batch_size, train=True, seed=self.seed,
                       epoch=epoch, augment=self.augment, start=start, epochs=epochs, workers=self.workers,
                       balanced=self.balanced)

    def eval_batches(self, split: str) -> Iterator[dict]:
        # Reader threads: an evaluation at every epoch's end would pay the workers' start each time.
        return batches(self.dataset.splits[split], self.prep, self.batch_size, train=False)


@dataclass
class FeatureSource:
    """Batches of cached pooled features (the head's input), or of cached maps (`MAPS`), one `FeatureSet` per
    split."""

    features: dict[str, FeatureSet]
    batch_size: int
    seed: int
    inputs: Inputs = FEATURES
    flip: bool = False  # maps: mirror each training example's maps at random (the step does it)
    balanced: bool = False  # training draws classes evenly (`data.sampler="balanced"`)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.features)

    def count(self, split: str) -> int:
        return len(self.features[split])

    def steps_per_epoch(self) -> int:
        return len(self.features["train"]) // self.batch_size

    def eval_steps(self, split: str) -> int:
        return -(-len(self.features[split]) // self.batch_size)

    def train_batches(self, epoch: int, start: int = 0, epochs: int = 1) -> Iterator[dict]:
        for e in range(epoch, epoch + epochs):
            yield from feature_batches(self.features["train"], self.batch_size, train=True, seed=self.seed, epoch=e,
                                       start=start if e == epoch else 0, flip=self.flip, balanced=self.balanced)

    def eval_batches(self, split: str) -> Iterator[dict]:
        return feature_batches(self.features[split], self.batch_size, train=False)
