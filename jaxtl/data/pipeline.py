"""Batches for training and evaluation through Grain: decode, augment, batch, prefetch, per-process slicing.

Batches are uint8 (`images` (B, H, W, 3)): a quarter of float32's bytes to move to the device, where the steps
normalise them (`jaxtl.train.steps.Inputs`). Decoding runs in Grain's reader threads, or with `workers > 0` in that
many worker processes (past the GIL, on hosts with many cores; each costs a few seconds to start, so a training
stream spans all remaining epochs).

Determinism: the epoch's order comes from `(seed, epoch)` and each example's augmentation from
`(seed, epoch, example index)`, so batches are identical whatever the threads or workers, and a resumed run sees
exactly the batches the interrupted one would have. With several processes, each decodes only its slice of
every global batch (`jaxtl.core.processes.ProcessSlice`, by default this process's).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import grain.python as grain
import numpy as np

from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.processes import ProcessSlice
from jaxtl.data.augment import Policy
from jaxtl.data.preprocess import PIL_FILTERS, eval_pixels
from jaxtl.data.split import Split, example_label


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation: random resized crop (scale, ratio as torchvision) and horizontal flip on the host;
    `policy` (RandAugment, colour jitter, random erasing: `jaxtl.data.augment`) in the train step."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    enabled: bool = True
    policy: Policy = Policy()


def _random_resized_crop(width: int, height: int, rng: np.random.Generator, aug: Augment
                         ) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box `(left, top, right, bottom)` in an image of `width` x `height`."""
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


def draft_factor(box: tuple[int, int, int, int], size: int) -> int:
    """The largest JPEG DCT scale (1, 2, 4 or 8) at which the crop `box` of a full-size image keeps both sides at
    least `size` pixels: the decoder then skips what the resize would throw away."""
    short = min(box[2] - box[0], box[3] - box[1])
    return next((f for f in (8, 4, 2) if short >= f * size), 1)


def train_pixels(split: Split, index: int, prep: Preprocessing, aug: Augment, rng: np.random.Generator
                 ) -> tuple[np.ndarray, bool]:
    """uint8 HWC: a random resized crop of example `index` at `prep.input_size` (a JPEG decoded at the smallest DCT
    scale its box allows), and whether to flip it (half the time; the flip itself is done on the device,
    `flip_on_device`). The box depends only on the image's full size and `rng`."""
    if not aug.enabled:
        return eval_pixels(split.load(index, prep.resize_size), prep, exif=False), False
    full = {}

    def scale(width: int, height: int) -> int:  # called with the upright full size, before decoding
        full["size"] = (width, height)
        full["box"] = _random_resized_crop(width, height, rng, aug)
        return draft_factor(full["box"], prep.input_size)

    image = split.load(index, scale=scale)
    if "box" not in full:  # not a JPEG: decoded whole, the box drawn from its size
        full["size"], full["box"] = image.size, _random_resized_crop(*image.size, rng, aug)
    sx, sy = image.size[0] / full["size"][0], image.size[1] / full["size"][1]
    left, top, right, bottom = full["box"]
    box = (left * sx, top * sy, right * sx, bottom * sy)
    image = image.resize((prep.input_size, prep.input_size), PIL_FILTERS[prep.interpolation], box=box)
    return np.asarray(image), bool(aug.flip and rng.random() < 0.5)


def flip_on_device(images, flip, xp=np):
    """Mirrors the images whose `flip` is set (inside the jitted step: a copy on the host saved per image)."""
    return xp.where(flip[:, None, None, None] > 0, images[:, :, ::-1, :], images)


def canvas_side(split: Split, prep: Preprocessing, aug: Augment) -> int:
    """The side of the square window that holds any random-resized-crop box of an image of the decoded-image cache,
    whose shorter side is the cache's (a box's long side is at most the largest aspect ratio times the short
    side)."""
    widest = max(aug.crop_ratio[1], 1 / aug.crop_ratio[0])
    return int(math.ceil(widest * getattr(split, "side", prep.resize_size)))


def crop_window(pixels: np.ndarray, box: tuple[int, int, int, int], window: np.ndarray) -> np.ndarray:
    """Fills the square `window` with the part of `pixels` that holds `box` (left, top, right, bottom), the last row
    and column repeated past the image's edges (as the resize kernels clamp there); returns the box's
    `(top, left, height, width)` within the window: what the device resizes."""
    left, top, right, bottom = box
    side, (height, width) = window.shape[0], pixels.shape[:2]
    x0, y0 = min(left, max(width - side, 0)), min(top, max(height - side, 0))
    part = pixels[y0 : y0 + side, x0 : x0 + side]
    rows, cols = part.shape[:2]
    window[:rows, :cols] = part
    window[rows:, :cols] = part[-1:]
    window[:, cols:] = window[:, cols - 1 : cols]
    return np.array([top - y0, left - x0, bottom - top, right - left], np.float32)


def crop_resize_on_device(windows, boxes, size: int, interpolation: str):
    """Each window's box resized to `size` x `size` (antialiased when shrinking), inside the jitted step: the
    decoded-image cache sends windows and boxes, and the host's share of an augmented example is a copy."""
    import jax
    import jax.numpy as jnp

    method = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}[interpolation]

    def one(window, box):
        scale = jnp.array([size / box[2], size / box[3]])
        translation = -box[:2] * scale
        return jax.image.scale_and_translate(window.astype(jnp.float32), (size, size, 3), (0, 1), scale, translation,
                                             method=method, antialias=True, precision=jax.lax.Precision.DEFAULT)

    resized = jax.vmap(one)(windows, boxes)
    return jnp.clip(jnp.round(resized), 0, 255)


def num_batches(split: Split, global_batch: int, train: bool) -> int:
    return len(split) // global_batch if train else -(-len(split) // global_batch)


SAMPLERS = ("uniform", "balanced")


def balanced_order(labels: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """An epoch of `len(labels)` draws in which each class comes up as often as the others (within one): each
    class's examples in a seeded permutation, repeated as its share needs (a rare class's examples several times, a
    common one's a part of them, a different part each epoch), the whole shuffled; from `(seed, epoch)` alone, so a
    resumed run draws the same."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np.random.default_rng([seed, epoch, 2])
    shares = np.full(len(classes), len(labels) // len(classes))
    shares[rng.permutation(len(classes))[: len(labels) % len(classes)]] += 1
    drawn = []
    for c, share in zip(classes, shares):
        members = np.flatnonzero(labels == c)
        drawn.append(np.concatenate([rng.permutation(members) for _ in range(-(-share // len(members)))])[:share])
    return rng.permutation(np.concatenate(drawn))


def _epoch_order(count: int, train: bool, seed: int, epoch: int, labels: np.ndarray | None) -> np.ndarray:
    if not train:
        return np.arange(count)
    return balanced_order(labels, seed, epoch) if labels is not None else np.random.default_rng(
        [seed, epoch]).permutation(count)


def _occurrences(order: np.ndarray) -> np.ndarray:
    """For each position of `order`, how many times its example came up before it in the epoch (0 the first)."""
    sort = np.argsort(order, kind="stable")
    ranks = np.arange(len(order)) - np.searchsorted(order[sort], order[sort])
    occurrences = np.empty(len(order), np.int64)
    occurrences[sort] = ranks
    return occurrences


def batch_indices(count: int, global_batch: int, *, train: bool, seed: int = 0, epoch: int = 0,
                  processes: ProcessSlice | None = None, labels: np.ndarray | None = None,
                  occurrences: bool = False) -> Iterator[np.ndarray]:
    """The example indices of this process's part of each global batch over `count` examples.

    Training shuffles by `(seed, epoch)` (with `labels`, draws classes evenly: `balanced_order`) and drops the
    incomplete last batch; evaluation keeps order and its last batch is short (the caller pads it and masks the
    padding). Each process gets the same-sized contiguous slice of every global batch (`processes`; default: this
    process's). With `occurrences`, each item is `(indices, how many times each came up before in the epoch)`.
    """
    processes = processes or ProcessSlice.current()
    processes.local(global_batch)  # divisible, or an error
    order = _epoch_order(count, train, seed, epoch, labels)
    seen = _occurrences(order) if occurrences else None
    batches_ = count // global_batch if train else -(-count // global_batch)
    for b in range(batches_):
        part = slice(b * global_batch, (b + 1) * global_batch)
        index = processes.of(order[part], global_batch)
        yield (index, processes.of(seen[part], global_batch)) if occurrences else index


def epoch_elements(count: int, global_batch: int, *, train: bool, seed: int = 0, epoch: int = 0,
                   processes: ProcessSlice | None = None, start: int = 0,
                   labels: np.ndarray | None = None) -> np.ndarray:
    """`(epoch, example, occurrence)` triples of this process's part of the epoch's batches from batch `start` on,
    in order (`occurrence`: how many times the example came up before in the epoch, which only a balanced sampler
    repeats); an evaluation's short last batch is padded with example -1 (masked out)."""
    processes = processes or ProcessSlice.current()
    local = processes.local(global_batch)
    parts, repeats = [], []
    for index, seen in list(batch_indices(count, global_batch, train=train, seed=seed, epoch=epoch,
                                          processes=processes, labels=labels, occurrences=True))[start:]:
        padded, again = np.full(local, -1, np.int64), np.zeros(local, np.int64)
        padded[: len(index)], again[: len(index)] = index, seen
        parts.append(padded)
        repeats.append(again)
    examples = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    again = np.concatenate(repeats) if repeats else np.zeros(0, np.int64)
    return np.stack([np.full_like(examples, epoch), examples, again], axis=1)


class LoadExample(grain.MapTransform):
    """An `(epoch, example)` element -> `{"images": uint8 (H, W, 3), "labels", "mask", "flip"}` (and `"boxes"` for a
    crop the device resizes); example -1 is padding (mask 0). One Grain element per example, so that the examples
    of a batch are decoded in parallel (reader threads or worker processes) and batched after, in order.

    Holds only picklable things (file names or the cache's path, the preprocessing), so Grain's worker processes
    can run it."""

    def __init__(self, split: Split, prep: Preprocessing, augment: Augment, seed: int, train: bool):
        self.split, self.prep, self.augment, self.seed, self.train = split, prep, augment, seed, train
        self.crops_on_device = train and augment.enabled and getattr(split, "decoded", False)
        self.side = canvas_side(split, prep, augment) if self.crops_on_device else prep.input_size

    def map(self, element: np.ndarray) -> dict:
        epoch, index, again = (int(v) for v in element)
        example = {"images": np.zeros((self.side, self.side, 3), np.uint8),
                   "labels": example_label(self.split.labels, None),
                   "mask": np.float32(0.0), "flip": np.uint8(0)}
        if self.crops_on_device:
            example["boxes"] = np.array([0, 0, self.side, self.side], np.float32)
        if index < 0:  # padding
            return example
        example["labels"], example["mask"] = example_label(self.split.labels, index), np.float32(1.0)
        # an example drawn again in an epoch (a balanced sampler's) is augmented anew
        rng = np.random.default_rng([self.seed, epoch, index, *([again] if again else [])]) if self.train else None
        if self.crops_on_device:
            pixels = self.split.pixels(index)
            box = _random_resized_crop(pixels.shape[1], pixels.shape[0], rng, self.augment)
            example["boxes"] = crop_window(pixels, box, example["images"])
            example["flip"] = np.uint8(self.augment.flip and rng.random() < 0.5)
        elif self.train:
            example["images"], flip = train_pixels(self.split, index, self.prep, self.augment, rng)
            example["flip"] = np.uint8(flip)
        else:
            example["images"] = eval_pixels(self.split.load(index, self.prep.resize_size), self.prep, exif=False)
        return example


def batches(
    split: Split,
    prep: Preprocessing,
    global_batch: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    augment: Augment = Augment(),
    processes: ProcessSlice | None = None,
    workers: int = 0,
    start: int = 0,
    epochs: int = 1,
    threads: int = 0,
    balanced: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of each global batch: `images` (B, H, W, 3) uint8, `labels` (B,) int32 (multi-label:
    (B, C) float32 multi-hot), `mask` (B,) and `flip`
    (B,): the images to mirror (`flip_on_device`; the steps do it).

    Training shuffles and drops the incomplete last batch; evaluation keeps order and pads the last batch,
    with `mask` 0 on the padding. `start` skips the first epoch's first batches without decoding them (a run
    resumed mid-epoch); `epochs` > 1 streams that many epochs from one iterator (one start of the workers).
    `workers` > 0 decodes in that many processes, else in threads of this one; `threads` decoding threads per
    process (0: two per core, shared among the workers). `balanced`: training draws classes evenly
    (`balanced_order`, `data.sampler="balanced"`).
    """
    processes = processes or ProcessSlice.current()
    local = processes.local(global_batch)
    labels = split.labels if balanced and train else None
    elements = np.concatenate([
        epoch_elements(len(split), global_batch, train=train, seed=seed, epoch=e, processes=processes,
                       start=start if e == epoch else 0, labels=labels)
        for e in range(epoch, epoch + epochs)])
    if not len(elements):
        return iter(())
    dataset = grain.MapDataset.source(elements).map(LoadExample(split, prep, augment, seed, train))
    return iterate(dataset, workers, local, threads)


def iterate(dataset: grain.MapDataset, workers: int, batch: int, threads: int = 0) -> Iterator:
    """Grain's iterator over `dataset`'s examples in batches of `batch`, in order whatever decodes them: reader
    threads of this process, each example on its own (a batch's images decoded in parallel, batched after); or
    `workers` worker processes, each decoding whole batches (one transfer to this process per batch, so that the
    workers' work scales with their number and this process only receives)."""
    automatic = 2 * (os.cpu_count() or 1)  # decoding releases the GIL; two threads per core hide the Python between
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; jaxtl does not use absl's app
            flags.FLAGS.mark_as_parsed()
        options = grain.ReadOptions(num_threads=threads or max(automatic // workers, 1), prefetch_buffer_size=2)
        batched = dataset.batch(batch, drop_remainder=False).to_iter_dataset(read_options=options)
        return iter(batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))
    examples = dataset.to_iter_dataset(read_options=grain.ReadOptions(num_threads=threads or automatic,
                                                                      prefetch_buffer_size=2 * batch))
    return iter(examples.batch(batch, drop_remainder=False))
