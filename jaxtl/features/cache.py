"""The on-disk feature cache: a frozen backbone's features of a split, computed once and memory-mapped after.

An entry of the content-addressed store (`jaxtl.core.store`, shared with the decoded-image cache) keyed by
everything that changes the features:

- the backbone: model name and build arguments, compute dtype, and the weights' identity (registered id and its
  hash; a local file's sha256; or, for random init, the seed),
- the preprocessing (input size, crop, mean/std, interpolation) and whether images are turned upright by their
  EXIF orientation,
- the examples: the sha256 of every image's bytes and its label, in order (a changed, added, removed or
  relabelled image is another key).

Inside, one `<layer>.<pooled|map>.npy` per layer (the layer and pooling are in the file name, so a later run that
needs another layer of the same data adds a file instead of recomputing the others), `labels.npy` and
`meta.json`. Reads are `np.load(mmap_mode="r")`: a cache larger than RAM works, pages load as they are touched.
With several processes, every process extracts its slice of each batch and the entry is written once where the
cache directory is shared, once per host where it is local. A file whose bytes changed since it was written (its
checksum), that fails to load or that has the wrong length is reported and recomputed; the space a file needs is
reserved on disk before it is memory-mapped, so a full disk is an error naming the directory, not a crash.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import numpy as np
from jax.sharding import Mesh

from jaxtl.core.atomic import publishing, reserve
from jaxtl.core.paths import cache_dir
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.processes import any_process
from jaxtl.core.store import Entry, Store, plain
from jaxtl.data.split import Split, split_fingerprint
from jaxtl.features.extract import extract_features
from jaxtl.weights.create import Weights

FORMAT_VERSION = 3  # 2: backbones name their pooled last features pre_logits; 3: files carry checksums
log = logging.getLogger(__name__)


def default_root() -> Path:
    """`$JAXTL_CACHE_DIR/features` (default `~/.cache/jaxtl/features`)."""
    return cache_dir() / "features"


def describe_backbone(model_name: str, weights: Weights | None, backbone_kwargs: dict, dtype: str,
                      seed: int = 0) -> dict:
    """What identifies a backbone's features: name, build arguments, dtype and the weights' identity (for random
    init, the seed)."""
    identity = weights.identity if weights is not None else {"random_init_seed": seed}
    return {"model": model_name, "kwargs": plain(dict(backbone_kwargs)), "dtype": dtype, "weights": identity}


def cache_entry(backbone: dict, prep: Preprocessing, split: Split, root: str | Path | None = None) -> Entry:
    """The split's entry: `backbone` from `describe_backbone`."""
    return Store(root or default_root()).entry({
        "format": FORMAT_VERSION, "backbone": backbone, "preprocessing": dataclasses.asdict(prep),
        "exif_orientation": getattr(split, "exif", True),
        "examples": {"count": len(split), "sha256": split_fingerprint(split)}})


def feature_file(layer: str, pool: bool) -> str:
    return f"{layer}.{'pooled' if pool else 'map'}.npy"


def _load(entry: Entry, name: str, count: int) -> np.ndarray | None:
    """The memory-mapped array `name` of `entry`, or None if it is missing or unusable (then it is recomputed)."""
    path = entry.file(name)
    if not path.is_file():
        return None
    damage = entry.damage(name)
    if damage:
        log.warning("feature cache file %s cannot be used: %s; recomputing it", path, damage)
        return None
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        log.warning("feature cache file %s is unreadable (%s); recomputing it", path, e)
        return None
    if array.shape[:1] != (count,):
        log.warning("feature cache file %s holds %s rows, expected %d; recomputing it", path, array.shape[:1], count)
        return None
    return array


def write_features(files: dict[str, Path], backbone: nn.Module, variables: dict, split: Split, prep: Preprocessing,
                   layers: Sequence[str], pool: bool, *, batch_size: int = 64, mesh: Mesh | None = None,
                   progress: bool = False, desc: str = "extract", workers: int = 0) -> None:
    """Extracts `layers` of `split` straight into `.npy` files (memory-mapped while written) at the temporary paths
    `files[feature_file(layer, pool)]`, and the labels at `files["labels.npy"]`. Every process computes (each
    decodes its slice of every batch, all receive all the features)."""
    def allocate(layer: str, shape: tuple[int, ...]) -> np.ndarray:
        path = files[feature_file(layer, pool)]
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        reserve(path, path.stat().st_size)  # a full disk: an error now, not SIGBUS in a write through the map
        return array

    if layers:
        arrays = extract_features(backbone, variables, split, prep, layers, pool=pool, batch_size=batch_size,
                                  mesh=mesh, allocate=allocate, progress=progress, desc=desc, workers=workers)
        for array in arrays.values():
            array.flush()
        del arrays
    with open(files["labels.npy"], "wb") as f:  # np.save(path) would append ".npy" to the temporary name
        np.save(f, np.asarray(split.labels, np.int32))


def extract_to_directory(directory: Path, backbone: nn.Module, variables: dict, split: Split, prep: Preprocessing,
                         layers: Sequence[str], pool: bool, extra: dict[str, bytes] | None = None, **kwargs) -> None:
    """`write_features` into a folder of the user's (`run.py extract`), published when every file is complete."""
    names = [feature_file(layer, pool) for layer in layers] + ["labels.npy", *(extra or {})]
    with publishing(directory, names) as files:
        write_features(files, backbone, variables, split, prep, layers, pool, **kwargs)
        for name, content in (extra or {}).items():
            files[name].write_bytes(content)


def cached_features(
    entry: Entry,
    backbone: nn.Module,
    variables: dict,
    split: Split,
    prep: Preprocessing,
    layers: Sequence[str],
    *,
    pool: bool = True,
    batch_size: int = 64,
    mesh: Mesh | None = None,
    progress: bool = False,
    desc: str = "extract",
    workers: int = 0,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`({layer: memory-mapped (N, ...) array}, labels)`: read from `entry`, computing (in one pass) and storing
    whichever layers it lacks. `backbone`/`variables` must be the backbone `entry` describes."""
    count = len(split)
    found = {layer: _load(entry, feature_file(layer, pool), count) for layer in layers}
    labels = _load(entry, "labels.npy", count)
    if labels is not None and not np.array_equal(labels, split.labels):
        labels = None
    # a file missing on any host is computed by all (extraction is a collective)
    missing = any_process([found[layer] is None for layer in layers] + [labels is None])
    missing, labels_missing = [layer for layer, miss in zip(layers, missing) if miss], missing[-1]
    if missing or labels_missing:
        log.info("feature cache miss: %s of %d examples -> %s", ", ".join(missing) or "labels", count, entry.path)
        with entry.writing([feature_file(layer, pool) for layer in missing] + ["labels.npy"]) as files:
            write_features(files, backbone, variables, split, prep, missing, pool, batch_size=batch_size, mesh=mesh,
                           progress=progress, desc=desc, workers=workers)
        found = {layer: _load(entry, feature_file(layer, pool), count) for layer in layers}
        labels = _load(entry, "labels.npy", count)
    else:
        log.info("feature cache hit: %s of %d examples <- %s", ", ".join(layers), count, entry.path)
    return found, np.asarray(labels)
