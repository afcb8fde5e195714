"""Batches for training and evaluation: parallel decode, augmentation, prefetch, per-process slicing.

Determinism: the epoch's order comes from `(seed, epoch)` and each example's augmentation from
`(seed, epoch, example index)`, so batches are identical whatever the thread timing, and a resumed run sees
exactly the batches the interrupted one would have. With several processes, each decodes only its slice of
every global batch.
"""

from __future__ import annotations

import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from jaxtl.data.folder import Split
from jaxtl.data.preprocess import _INTERPOLATIONS, Preprocessing, eval_transform, normalize


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation: random resized crop (scale, ratio as torchvision) and horizontal flip."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    enabled: bool = True


def _random_resized_crop(image: Image.Image, rng: np.random.Generator, aug: Augment) -> tuple[int, int, int, int]:
    width, height = image.size
    area = width * height
    log_ratio = (math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*aug.crop_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    side = min(width, height)  # fallback: central square
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def train_example(image: Image.Image, prep: Preprocessing, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    if not aug.enabled:
        return eval_transform(image, prep)
    box = _random_resized_crop(image, rng, aug)
    image = image.resize((prep.input_size, prep.input_size), _INTERPOLATIONS[prep.interpolation], box=box)
    pixels = np.asarray(image)
    if aug.flip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return normalize(pixels, prep)


def num_batches(split: Split, global_batch: int, train: bool) -> int:
    return len(split) // global_batch if train else -(-len(split) // global_batch)


def batch_indices(
    count: int, global_batch: int, *, train: bool, seed: int = 0, epoch: int = 0, process_index: int = 0,
    process_count: int = 1,
) -> Iterator[np.ndarray]:
    """The example indices of this process's part of each global batch over `count` examples.

    Training shuffles by `(seed, epoch)` and drops the incomplete last batch; evaluation keeps order and its last
    batch is short (the caller pads it and masks the padding). Each process gets the same-sized contiguous slice
    of every global batch.
    """
    if global_batch % process_count:
        raise ValueError(f"batch size {global_batch} is not divisible by the {process_count} processes")
    local = global_batch // process_count
    order = np.random.default_rng([seed, epoch]).permutation(count) if train else np.arange(count)
    batches_ = count // global_batch if train else -(-count // global_batch)
    for b in range(batches_):
        start = b * global_batch + process_index * local
        yield order[start : start + local]


def batches(
    split: Split,
    prep: Preprocessing,
    global_batch: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    augment: Augment = Augment(),
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    workers: int | None = None,
    start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of each global batch: `images` (B, H, W, 3), `labels` (B,), `mask` (B,).

    Training shuffles and drops the incomplete last batch; evaluation keeps order and pads the last batch,
    with `mask` 0 on the padding. `start` skips the epoch's first batches without decoding them (a run resumed
    mid-epoch).
    """
    local = global_batch // process_count
    indices = list(batch_indices(len(split), global_batch, train=train, seed=seed, epoch=epoch,
                                 process_index=process_index, process_count=process_count))[start:]

    def make(batch_index: int, pool: ThreadPoolExecutor) -> dict[str, np.ndarray]:
        idx = indices[batch_index]

        def load(i):
            image = split.load(i, prep.resize_size)
            if train:
                return train_example(image, prep, augment, np.random.default_rng([seed, epoch, i]))
            return eval_transform(image, prep)

        images = np.zeros((local, prep.input_size, prep.input_size, 3), np.float32)
        labels = np.zeros((local,), np.int32)
        mask = np.zeros((local,), np.float32)
        for j, image in enumerate(pool.map(load, idx)):
            images[j] = image
        labels[: len(idx)] = split.labels[idx]
        mask[: len(idx)] = 1.0
        return {"images": images, "labels": labels, "mask": mask}

    yield from _prefetched(make, len(indices), prefetch, workers)


def _prefetched(make, count: int, depth: int, workers: int | None) -> Iterator:
    """Runs `make(i, pool)` for i < count in a background thread, `depth` batches ahead."""
    results: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def produce():
        with ThreadPoolExecutor(workers) as pool:
            try:
                for i in range(count):
                    if stop.is_set():
                        return
                    results.put(make(i, pool))
            except BaseException as e:  # surfaced in the consumer
                results.put(e)
            results.put(StopIteration)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := results.get()) is not StopIteration:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                results.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
