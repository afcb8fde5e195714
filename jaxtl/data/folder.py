"""Image-folder datasets: class sub-folders, with or without `train`/`val`/`test` split folders.

Without split folders, a deterministic stratified split is drawn from a seed. Class names come from the folder
names (sorted), so indices are stable across runs and machines.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxtl.data.preprocess import ImageReadError, load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
_SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test",)}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """The examples of one split: image files (or a random-access record source) and their labels.

    records: for TFDS, a random-access source whose items hold the decoded image under `image_key`; `files`
      then holds a name per example for messages.
    """

    files: tuple[Path | str, ...]
    labels: np.ndarray
    records: Any = None
    image_key: str = "image"

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: np.ndarray) -> "Split":
        """The examples at `index`, in that order."""
        index = np.asarray(index, np.int64)
        records = _Records(self.records, index) if self.records is not None else None
        return Split(tuple(self.files[i] for i in index), self.labels[index], records, self.image_key)

    def raw_bytes(self, index: int) -> bytes:
        """Example `index` as stored (the encoded image): what a content hash of the split reads."""
        if self.records is not None:
            raw = self.records[int(index)][self.image_key]
            return raw if isinstance(raw, bytes) else np.ascontiguousarray(raw).tobytes()
        return Path(self.files[index]).read_bytes()

    def load(self, index: int, draft_size: int) -> Image.Image:
        """Example `index` as an RGB PIL image; JPEG files are decoded at a reduced scale when much larger than
        `draft_size` (PIL's draft mode)."""
        if self.records is not None:
            raw = self.records[int(index)][self.image_key]
            if isinstance(raw, bytes):  # encoded (TFDS with decoding skipped)
                try:
                    return load_image(Image.open(io.BytesIO(raw)))
                except (UnidentifiedImageError, OSError) as e:
                    raise ImageReadError(f"cannot decode {self.files[index]}: {e}") from e
            return load_image(Image.fromarray(np.asarray(raw)))
        path = self.files[index]
        if str(path).lower().endswith((".jpg", ".jpeg")):
            try:
                with Image.open(path) as image:
                    image.draft("RGB", (draft_size, draft_size))
                    return load_image(image.convert("RGB") if image.mode != "RGB" else image.copy())
            except (UnidentifiedImageError, OSError) as e:
                raise ImageReadError(f"cannot read image '{path}': {e}") from e
        return load_image(path)


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
    class_names: tuple[str, ...]
    splits: dict[str, Split]
    source: str
    skipped: tuple[Path, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError):
        return False


def _class_files(folder: Path, class_names: tuple[str, ...] | None) -> tuple[tuple[str, ...], list[Path], list[int]]:
    found = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if class_names is None:
        class_names = found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ValueError(f"{folder} has class folders {unknown} that the train split does not have")
    files, labels = [], []
    for index, name in enumerate(class_names):
        images = list_images(folder / name) if (folder / name).is_dir() else []
        files += images
        labels += [index] * len(images)
    return class_names, files, labels


def _stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
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


def folder_dataset(
    root: str | Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_images: bool = False,
) -> ImageDataset:
    """Reads a folder of class sub-folders (optionally under `train/`, `val/`, `test/`).

    Every image is checked to decode; an unreadable one is an error naming it, or, with `skip_bad_images`,
    is left out and listed in `ImageDataset.skipped`.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder '{root}' does not exist")
    split_dirs = {}
    for split, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            if (root / alias).is_dir():
                split_dirs[split] = root / alias
                break
    raw: dict[str, tuple[list[Path], list[int]]] = {}
    if split_dirs:
        if "train" not in split_dirs:
            raise ValueError(f"{root} has split folders {sorted(split_dirs)} but no 'train' folder")
        class_names, files, labels = _class_files(split_dirs["train"], None)
        raw["train"] = (files, labels)
        for split in ("val", "test"):
            if split in split_dirs:
                raw[split] = _class_files(split_dirs[split], class_names)[1:]
    else:
        class_names, files, labels = _class_files(root, None)
        fractions = {k: v for k, v in (("val", val_fraction), ("test", test_fraction)) if v > 0}
        labels_array = np.asarray(labels)
        for split, indices in _stratified_split(labels_array, fractions, seed).items():
            raw[split] = ([files[i] for i in indices], labels_array[indices].tolist())
    if len(class_names) < 2:
        raise ValueError(f"{root}: found {len(class_names)} class folder(s); need at least 2 (one folder per class)")

    splits, skipped = {}, []
    for split, (files, labels) in raw.items():
        keep = []
        for i, path in enumerate(files):
            if _readable(path):
                keep.append(i)
            elif skip_bad_images:
                skipped.append(path)
            else:
                raise ValueError(f"cannot read image '{path}'; fix or remove it, or set data.skip_bad_images=True")
        splits[split] = Split(tuple(files[i] for i in keep), np.asarray([labels[i] for i in keep], np.int32))
    if skipped:
        log.warning("skipped %d unreadable image(s): %s", len(skipped), ", ".join(map(str, skipped[:5])))
    if not len(splits["train"]):
        raise ValueError(f"{root}: the train split has no images")
    return ImageDataset(class_names, splits, str(root), tuple(skipped))
