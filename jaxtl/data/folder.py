"""Image-folder datasets: class sub-folders, with or without `train`/`val`/`test` split folders.

A split without its own folder is carved from train: a deterministic stratified sample drawn from a seed
(`val_fraction`, `test_fraction`). Class names come from the folder names (sorted), so indices are stable across
runs and machines. Every image is checked before training: an unreadable one (or one over the pixel limit) is an
error naming it, or skipped and counted; an empty class folder is an error; a broken symlink is skipped with a
warning naming it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from jaxtl.core import locations
from jaxtl.core.errors import DataError, ImageReadError, JaxtlError, MissingFileError
from jaxtl.core.locations import Location
from jaxtl.data.images import DEFAULT_MAX_PIXELS, verify_image
from jaxtl.data.manifest import Manifest, map_in_chunks
from jaxtl.data.split import (ImageDataset, Split, fractions_to_carve, label_counts, multi_hot,
                              stratified_split)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test",)}

log = logging.getLogger(__name__)


def list_images(folder: Location) -> list[Location]:
    """Image files under `folder` (recursively, following symlinks to files), sorted. A broken symlink is left out
    with a warning naming it. A URL's files through its file system (`jaxtl.core.locations`)."""
    if locations.is_url(folder):
        return locations.files_under(folder, IMAGE_SUFFIXES)
    found = []
    for directory, _, names in os.walk(folder):
        for name in names:
            if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                found.append(path)
            elif os.path.islink(path):
                log.warning("skipping broken symlink %s -> %s", path, os.readlink(path))
    return [Path(p) for p in sorted(found)]


def split_folders(root: Location) -> dict[str, Location]:
    """The split folders of a dataset folder (`train`, `val`, `test` or their aliases); {} for a flat one."""
    found = {}
    present = set(locations.subfolders(root))
    for split, aliases in SPLIT_FOLDERS.items():
        for alias in aliases:
            if alias in present:
                found[split] = locations.join(root, alias)
                break
    if found and "train" not in found:
        raise DataError(f"{root} has split folders {sorted(found)} but no 'train' folder")
    return found


def _class_files(folder: Location, class_names: tuple[str, ...] | None
                 ) -> tuple[tuple[str, ...], list[Location], list[int]]:
    found = tuple(locations.subfolders(folder))
    defining = class_names is None
    class_names = found if defining else class_names
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DataError(f"{folder} has class folders {unknown} that the train split does not have; train defines "
                        f"the classes ({', '.join(class_names)})")
    found_files, labels = [], []
    for index, name in enumerate(class_names):
        images = list_images(locations.join(folder, name)) if name in found else []
        if defining and not images:
            raise DataError(f"class folder '{locations.join(folder, name)}' holds no images "
                            f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder")
        found_files += images
        labels += [index] * len(images)
    return class_names, found_files, labels


def _verify_all(paths: list[Location], max_pixels: int, manifest: Manifest) -> list[str | None]:
    """For each file, None if it decodes, else the reason: files the manifest knows decode, unchanged, are not
    read again; the others are read once, checked and hashed, in threads (PIL and hashlib release the GIL)."""
    def check(path: Location) -> str | None:
        try:
            data = locations.read_bytes(path)  # read once: checked, and hashed for the caches' keys
        except (OSError, JaxtlError) as e:
            return f"cannot read image '{path}': {e}"
        try:
            verify_image(path, max_pixels, data)
            manifest.mark_decodes(path, hashlib.sha256(data).hexdigest())
            return None
        except ImageReadError as e:
            return str(e)

    known = map_in_chunks(manifest.decodes, paths)
    unknown = [path for path, ok in zip(paths, known) if not ok]
    problems = dict(zip(unknown, map_in_chunks(check, unknown, chunk=16)))
    return [problems.get(path) for path in paths]


def folder_dataset(
    root: str | Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_images: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exif: bool = True,
) -> ImageDataset:
    """Reads a folder of class sub-folders (optionally under `train/`, `val/`, `test/`).

    A split without a folder is carved from train with its fraction (0: none); `exif`: images are turned upright
    by their EXIF orientation when read. Every image is checked to decode; an unreadable one is an error naming it,
    or, with `skip_bad_images`, left out and listed in `ImageDataset.skipped`.
    """
    root = locations.as_location(root)
    if not locations.is_dir(root):
        raise MissingFileError(f"dataset folder '{root}' does not exist")
    folders = split_folders(root)
    class_names, train_files, labels = _class_files(folders.get("train", root), None)
    if len(class_names) < 2:
        raise DataError(f"{folders.get('train', root)}: found {len(class_names)} class folder(s); need at least 2 "
                        "(one folder of images per class)")
    given = {"train": (train_files, labels)} | {split: _class_files(folders[split], class_names)[1:]
                                          for split in ("val", "test") if split in folders}
    return checked_dataset(root, class_names, given, val_fraction, test_fraction, seed, skip_bad_images, max_pixels,
                           exif, "add images or remove the class folders")


def checked_dataset(root: Location, class_names: tuple[str, ...], given: dict[str, tuple[list[Location], list]],
                    val_fraction: float, test_fraction: float, seed: int, skip_bad_images: bool, max_pixels: int,
                    exif: bool, fix: str, source: str | None = None, multi_label: bool = False) -> ImageDataset:
    """The dataset of the splits `given` (`{split: (files, labels)}`, train among them), val and test carved from
    train with their fractions (seeded, stratified) where not given, every image checked to decode (the manifest of
    `root` remembers those that do): an unreadable one is an error naming it, or with `skip_bad_images` left out
    and listed; a class left without training images is an error ending with `fix`. Folders and manifests share
    it (`jaxtl.data.listing`). With `multi_label`, each label is a tuple of class indices, made multi-hot rows."""
    def as_array(labels: list) -> np.ndarray:
        return multi_hot(labels, len(class_names)) if multi_label else np.asarray(labels, np.int32).reshape(-1)

    carved = fractions_to_carve(given, val_fraction, test_fraction)
    raw = {split: (paths, as_array(labels)) for split, (paths, labels) in given.items()}
    paths, labels_array = raw["train"]
    for split, indices in stratified_split(labels_array, carved, seed).items():
        raw[split] = ([paths[i] for i in indices], labels_array[indices])
    raw = {split: raw[split] for split in ("train", "val", "test") if split in raw}
    everything = [path for split_files, _ in raw.values() for path in split_files]
    manifest = Manifest(root)
    problems = dict(zip(everything, _verify_all(everything, max_pixels, manifest)))
    manifest.save()
    bad = [path for path, problem in problems.items() if problem]
    if bad and not skip_bad_images:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ImageReadError(f"{problems[bad[0]]}{more}; fix or remove it, or set data.skip_bad_images=True")
    splits = {}
    for split, (split_files, split_labels) in raw.items():
        keep = [i for i, path in enumerate(split_files) if not problems[path]]
        labels = split_labels[np.asarray(keep, np.int64)]
        splits[split] = Split(tuple(split_files[i] for i in keep), labels, max_pixels=max_pixels, manifest=manifest,
                              exif=exif)
    if bad:
        log.warning("skipped %d unreadable image(s): %s", len(bad), ", ".join(map(str, bad[:5])))
    counts = label_counts(splits["train"].labels, len(class_names))
    if counts.min() == 0:
        empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
        raise DataError(f"{source or root}: class(es) {empty} have no readable training images; {fix}")
    return ImageDataset(class_names, splits, str(source or root), tuple(bad), carved)
