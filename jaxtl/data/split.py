"""A dataset in memory: its splits, each a list of examples (image files, or records of a TFDS source) and labels;
stratified carving of a split; and the fingerprint of a split's contents that every cache keys on.

Labels are a class index per example, `(N,)` int32, or for a multi-label dataset (`data.multi_label`) a multi-hot
row per example, `(N, C)` uint8 (1: the image has that label); `label_counts` counts either per class."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from jaxtl.core import locations
from jaxtl.core.errors import ImageReadError
from jaxtl.data.images import (DEFAULT_MAX_PIXELS, decode_jpeg_fast, jpeg_header, load_image, open_image, to_rgb,
                               upright, upright_size)
from jaxtl.data.manifest import Manifest, map_in_chunks


@dataclass(frozen=True)
class Split:
    """The examples of one split: image files (or a random-access record source) and their labels.

    records: for TFDS, a random-access source whose items hold the encoded image under `image_key`; `files`
      then holds a name per example for messages.
    max_pixels: images with more pixels are refused (`ImageReadError`).
    """

    files: tuple[Path | str, ...]
    labels: np.ndarray
    records: Any = None
    image_key: str = "image"
    max_pixels: int = DEFAULT_MAX_PIXELS
    manifest: Manifest | None = None  # what is known of the files (decodes, content sha256), by size and mtime
    exif: bool = True  # images turned upright by their EXIF orientation

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: np.ndarray) -> "Split":
        """The examples at `index`, in that order."""
        index = np.asarray(index, np.int64)
        records = _Records(self.records, index) if self.records is not None else None
        return Split(tuple(self.files[i] for i in index), self.labels[index], records, self.image_key,
                     self.max_pixels, self.manifest, self.exif)

    def content_sha256(self, index: int) -> str:
        """The sha256 of example `index` as stored: from the manifest while the file is unchanged."""
        if self.manifest is not None and self.records is None:
            return self.manifest.sha256(self.files[index])
        return hashlib.sha256(self.raw_bytes(index)).hexdigest()

    def raw_bytes(self, index: int) -> bytes:
        """Example `index` as stored (the encoded image): what a content hash of the split reads."""
        if self.records is not None:
            raw = self.records[int(index)][self.image_key]
            return raw if isinstance(raw, bytes) else np.ascontiguousarray(raw).tobytes()
        return locations.read_bytes(self.files[index])

    def load(self, index: int, draft_size: int = 0, scale: Callable[[int, int], int] | None = None) -> Image.Image:
        """Example `index` as an 8-bit RGB PIL image, upright (unless `exif` is off).

        A JPEG is decoded at a reduced scale where that loses nothing wanted (PIL's draft mode: libjpeg scales in
        the DCT domain, at a fraction of a full decode's cost): so that its shorter side stays at least
        `draft_size`, or, with `scale`, by the factor `scale(width, height)` returns for the image's upright full
        size (1, 2, 4 or 8; a training crop asks for what keeps its box at least the input size). A training crop's
        JPEG is read once and decoded by libjpeg-turbo straight from its bytes (`jpeg_header`, `decode_jpeg_fast`:
        no PIL unless the file has EXIF or is damaged), anything else by PIL."""
        name = str(self.files[index])
        if self.records is not None:
            raw = self.records[int(index)][self.image_key]
            if isinstance(raw, bytes):  # encoded (TFDS with decoding skipped)
                return load_image(raw, self.max_pixels, name, self.exif)
            return to_rgb(Image.fromarray(np.asarray(raw)))
        remote = locations.is_url(self.files[index])
        if not name.lower().endswith((".jpg", ".jpeg")):
            return load_image(locations.read_bytes(name) if remote else name, self.max_pixels, name, exif=self.exif)
        source, factor = (io.BytesIO(locations.read_bytes(name)) if remote else name), None
        if scale is not None:  # a training crop
            raw = source.getvalue() if remote else Path(name).read_bytes()
            header = jpeg_header(raw, name, self.max_pixels, self.exif)
            if header is not None:
                factor = scale(header[0], header[1])
                fast = decode_jpeg_fast(raw, factor, header[2])
                if fast is not None:
                    return fast
            source = io.BytesIO(raw)  # PIL decodes it, or names what is wrong with it
        with open_image(source, self.max_pixels, name) as image:
            try:
                if image.format == "JPEG":
                    if scale is not None and factor is None:
                        factor = scale(*(upright_size(image) if self.exif else image.size))
                    width, height = image.size
                    target = (-(-width // factor), -(-height // factor)) if factor else (draft_size, draft_size)
                    image.draft("RGB", target)
                image.load()
                return to_rgb(upright(image) if self.exif else image)
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageReadError(f"cannot read image '{name}': {e}") from e


class _Records:
    """Items `index` of a random-access record source."""

    def __init__(self, records: Any, index: np.ndarray):
        self.records, self.index = records, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        return self.records[int(self.index[i])]


@dataclass(frozen=True)
class ImageDataset:
    """class_names: index -> name. splits: train and any of val, test. skipped: unreadable images left out.
    carved: the splits drawn from train (not given as folders), with their fraction."""

    class_names: tuple[str, ...]
    splits: dict[str, Split]
    source: str
    skipped: tuple[Path, ...] = ()
    carved: dict[str, float] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def multi_label(self) -> bool:
        """Whether an image has any number of the labels (multi-hot rows) rather than one class."""
        return self.splits["train"].labels.ndim == 2


def label_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Examples per class: of each class index, or of each label of multi-hot rows."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.sum(0, dtype=np.int64)
    return np.bincount(labels.astype(np.int64), minlength=num_classes)


def multi_hot(label_sets: list, num_classes: int) -> np.ndarray:
    """`(N, C)` uint8 rows from each example's class indices."""
    rows = np.zeros((len(label_sets), num_classes), np.uint8)
    for i, indices in enumerate(label_sets):
        rows[i, list(indices)] = 1
    return rows


def example_label(labels: np.ndarray, index: int | None) -> np.ndarray:
    """Example `index`'s label as a batch holds it: an int32 class, or float32 multi-hot row; None: padding's."""
    if labels.ndim == 2:
        return labels[index].astype(np.float32) if index is not None else np.zeros(labels.shape[1], np.float32)
    return np.int32(labels[index]) if index is not None else np.int32(0)


def padded_labels(labels: np.ndarray, pad: int) -> np.ndarray:
    """A batch's labels with `pad` padding rows after them, as `example_label` gives them."""
    if labels.ndim == 2:
        return np.pad(labels, ((0, pad), (0, 0))).astype(np.float32)
    return np.pad(labels, (0, pad)).astype(np.int32)


def strata(labels: np.ndarray) -> np.ndarray:
    """A stratum per example for stratified carving: its class, or its set of labels (multi-hot rows)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels
    return np.unique(labels, axis=0, return_inverse=True)[1].reshape(-1)


def fractions_to_carve(present, val_fraction: float, test_fraction: float) -> dict[str, float]:
    """The val and test fractions to carve from train: those of the splits not `present` (split names), above 0."""
    return {k: v for k, v in (("val", val_fraction), ("test", test_fraction)) if k not in present and v > 0}


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Indices per part: each class's examples (each set of labels' for multi-hot rows) shuffled by `seed` and cut
    by `fractions` (`{"val": 0.2}`), the rest in "train"; each part sorted."""
    labels = strata(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {name: [] for name in ("train", *fractions)}
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for name, fraction in fractions.items():
            count = int(round(fraction * len(indices)))
            parts[name] += indices[start : start + count].tolist()
            start += count
        parts["train"] += indices[start:].tolist()
    return {name: np.sort(np.asarray(idx, dtype=np.int64)) for name, idx in parts.items() if idx}



def split_fingerprint(split: Split, workers: int = 8) -> str:
    """sha256 over every example's (content sha256, label), in order; contents hashed once per file and then
    taken from the folder's manifest while the file is unchanged (`jaxtl.data.manifest`)."""
    digests = map_in_chunks(split.content_sha256, list(range(len(split))), workers, chunk=64)
    if getattr(split, "manifest", None) is not None:
        split.manifest.save()
    total = hashlib.sha256()
    for content, label in zip(digests, split.labels.tolist()):
        total.update(f"{content}:{label}\n".encode())
    return total.hexdigest()
