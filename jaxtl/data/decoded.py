"""The decoded-image cache: every image of a split decoded once and stored as uint8 pixels, its shorter side at the
resize size of the preprocessing (or, for the train split, at the training resolution `data.decoded_cache_side`:
a cap that keeps ImageNet on a local disk), in one memory-mapped file; epochs after the first decode no JPEG.

An entry of the content-addressed store (`jaxtl.core.store`, as the feature cache's) keyed by the preprocessing's
resize size and interpolation and every image's content and label, in order (`jaxtl.data.split.split_fingerprint`):
a changed image is a new entry. Inside: `pixels.bin` (the images' pixels one after another, raw), `index.npy`
(per image: byte offset, height, width, CRC-32 of its pixels; checksummed as a file) and `meta.json`; a run killed
while preparing leaves nothing that is read back. Each image's CRC is checked the first time a process reads it:
an image whose bytes changed is decoded from its file instead, with a warning naming the entry, which the next run
prepares again.

Evaluation from the cache is exactly evaluation from the files: the stored image is what the evaluation transform
resizes to before its centre crop (JPEGs decoded in draft mode alike). Training crops the stored image instead of
the original: the same random-resized-crop boxes relative to the image, from a source at the resize size, and
resized on the device (`jaxtl.data.pipeline.crop_resize_on_device`), so the host's share of an example is a copy.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.processes import any_process
from jaxtl.core.store import Entry, Store
from jaxtl.data.preprocess import resize_shorter_side
from jaxtl.data.split import Split, split_fingerprint

FORMAT_VERSION = 2  # 2: a CRC-32 per image
log = logging.getLogger(__name__)


class DecodedSplit:
    """A split whose pixels come from a decoded-cache entry; files, labels and content hashes are the source's."""

    decoded = True  # the pipeline sends training crops as windows and boxes, resized on the device

    def __init__(self, source: Split, directory: Path, prep: Preprocessing, side: int,
                 rows: np.ndarray | None = None):
        self.source, self.directory, self.prep, self.side = source, Path(directory), prep, side
        self.rows = np.arange(len(source)) if rows is None else np.asarray(rows, np.int64)
        self._opened = None  # (pixels memory map, index, rows verified), opened on first read in each process
        self._lock = threading.Lock()

    # What every split has: the pipeline, the feature cache and messages read these.
    @property
    def files(self):
        return self.source.files

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels

    @property
    def max_pixels(self) -> int:
        return self.source.max_pixels

    @property
    def exif(self) -> bool:
        return self.source.exif

    def __len__(self) -> int:
        return len(self.source)

    @property
    def manifest(self):
        return self.source.manifest

    def raw_bytes(self, index: int) -> bytes:
        return self.source.raw_bytes(index)

    def content_sha256(self, index: int) -> str:
        return self.source.content_sha256(index)

    def subset(self, index: np.ndarray) -> "DecodedSplit":
        index = np.asarray(index, np.int64)
        return DecodedSplit(self.source.subset(index), self.directory, self.prep, self.side, self.rows[index])

    def pixels(self, index: int) -> np.ndarray:
        """Example `index` as stored: uint8 (H, W, 3), shorter side at the cache's resize size (a memory-map view);
        decoded from its file if its stored bytes fail their CRC."""
        if self._opened is None:  # one assignment: reader threads never see half of it
            table = np.load(self.directory / "index.npy")
            self._opened = (np.memmap(self.directory / "pixels.bin", np.uint8, mode="r"), table,
                            np.zeros(len(table), bool))
        data, table, verified = self._opened
        row = self.rows[index]
        offset, height, width, crc = table[row]
        pixels = data[offset : offset + height * width * 3]
        if not verified[row]:
            if len(pixels) != height * width * 3 or zlib.crc32(pixels) != crc:
                return self._from_source(index)
            verified[row] = True
        return pixels.reshape(height, width, 3)

    def _from_source(self, index: int) -> np.ndarray:
        """A damaged image, decoded again from its file; the entry is marked for preparing again next run."""
        with self._lock:
            index_file = self.directory / "index.npy"
            if index_file.exists():
                log.warning("decoded-image cache %s: the stored pixels of %s fail their CRC (damaged); decoding from "
                            "the file instead, and the entry is prepared again next run", self.directory,
                            self.source.files[index])
                index_file.unlink(missing_ok=True)
        return decode(self.source, index, self.prep, self.side)

    def load(self, index: int, draft_size: int = 0, scale=None) -> Image.Image:
        """Example `index` as stored, as an RGB PIL image."""
        return Image.fromarray(np.asarray(self.pixels(index)))

    def __getstate__(self) -> dict[str, Any]:  # worker processes reopen the memory map themselves
        return {"source": self.source, "directory": self.directory, "prep": self.prep, "side": self.side,
                "rows": self.rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["source"], state["directory"], state["prep"], state["side"], state["rows"])


def decode(split: Split, index: int, prep: Preprocessing, side: int) -> np.ndarray:
    """An image as the cache stores it: decoded, its shorter side resized to `side`."""
    image = resize_shorter_side(split.load(index, side), side, prep.interpolation)
    return np.asarray(image, np.uint8)


def decoded_entry(split: Split, prep: Preprocessing, root: Path, side: int = 0) -> Entry:
    """The split's entry in the content-addressed store under `root`, its images' shorter side at `side` (0: the
    preprocessing's resize size)."""
    return Store(root).entry({"format": FORMAT_VERSION, "side": side or prep.resize_size,
                              "interpolation": prep.interpolation, "exif_orientation": split.exif,
                              "examples": {"count": len(split), "sha256": split_fingerprint(split)}})


def _complete(entry: Entry, count: int) -> bool:
    """Both files there and consistent: the index as written (its checksum) and the pixels of its length (a damaged
    or truncated copy is prepared again)."""
    if not entry.file("index.npy").is_file():
        return False
    damage = entry.damage("index.npy")
    if damage:
        log.warning("decoded-image cache %s: index.npy cannot be used (%s); preparing the entry again", entry.path,
                    damage)
        return False
    try:
        index = np.load(entry.file("index.npy"))
        size = entry.file("pixels.bin").stat().st_size
    except (OSError, ValueError):
        return False
    return index.shape == (count, 4) and (count == 0 or index[-1, 0] + index[-1, 1] * index[-1, 2] * 3 == size)


def decoded_split(split: Split, prep: Preprocessing, root: Path, side: int = 0, threads: int = 16) -> DecodedSplit:
    """The split read from its decoded-cache entry under `root`, its images' shorter side at `side` (0: the
    preprocessing's resize size, which evaluation needs to be exact), prepared first if missing (in `threads`
    decoding threads). Every process of a job takes part; the files are written once per directory."""
    side = side or prep.resize_size
    entry = decoded_entry(split, prep, root, side)
    (missing,) = any_process([not _complete(entry, len(split))])  # prepared by all where any host lacks it
    if not missing:
        log.info("decoded-image cache hit: %d images <- %s", len(split), entry.path)
        return DecodedSplit(split, entry.path, prep, side)
    start = time.perf_counter()
    index = np.zeros((len(split), 4), np.int64)
    offset = 0
    with entry.writing(("pixels.bin", "index.npy"), checksummed=("index.npy",)) as files:
        with ThreadPoolExecutor(threads) as pool, open(files["pixels.bin"], "wb") as out:
            decoded = pool.map(lambda i: decode(split, i, prep, side), range(len(split)))
            for i, pixels in enumerate(decoded):  # in order, decoded in parallel
                out.write(pixels.tobytes())
                index[i] = offset, pixels.shape[0], pixels.shape[1], zlib.crc32(pixels)
                offset += pixels.size
        with open(files["index.npy"], "wb") as f:  # np.save(path) would append ".npy" to the temporary name
            np.save(f, index)
    log.info("decoded-image cache: %d images, %.0f MB -> %s in %.1f s", len(split), offset / 2**20, entry.path,
             time.perf_counter() - start)
    return DecodedSplit(split, entry.path, prep, side)


def decoded_dataset(dataset, prep: Preprocessing, root: Path, train_side: int = 0):
    """`dataset` with every split read from the decoded-image cache (each prepared on first use): the train split's
    images with their shorter side at `train_side` (0: the resize size), the others' at the resize size."""
    splits = {name: decoded_split(split, prep, root, train_side if name == "train" else 0)
              for name, split in dataset.splits.items()}
    return dataclasses.replace(dataset, splits=splits)
