"""The on-disk feature cache: a frozen backbone's features of a split, computed once and memory-mapped after.

An entry is a folder `<root>/<key>/` named by the sha256 of everything that changes the features:

- the backbone: model name and build arguments, compute dtype, and the weights (registered id and its hash; a
  local file's sha256; or, for random init, the seed),
- the preprocessing (input size, crop, mean/std, interpolation),
- the examples: the sha256 of every image's bytes and its label, in order (a changed, added, removed or
  relabelled image is another key).

Inside, one `<layer>.<pooled|map>.npy` per layer (the layer and pooling are in the file name, so a later run that
needs another layer of the same data adds a file instead of recomputing the others), `labels.npy` and
`meta.json` (the key's inputs, for people). Every file is written beside its final name and renamed when
complete (`jaxtl.atomic`), so a run killed mid-write leaves only `.*.tmp` files, which are never read and are
deleted a day later by the next write to the entry. Reads are `np.load(mmap_mode="r")`: a cache larger than RAM
works, pages load as they are touched.
With several processes, every process extracts its slice of each batch and the entry is written once where the
cache directory is shared, once per host where it is local (`jaxtl.atomic.publish`).
A file that fails to load or has the wrong length is reported and recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import numpy as np
from jax.sharding import Mesh

from jaxtl.atomic import publish, temporary_beside
from jaxtl.create import resolve_weights
from jaxtl.data.folder import Split
from jaxtl.data.manifest import map_in_chunks
from jaxtl.data.preprocess import Preprocessing
from jaxtl.distributed import any_process
from jaxtl.features.extract import extract_features
from jaxtl.weights.files import cache_dir, recorded_sha256, sha256_of
from jaxtl.weights.registry import PretrainedWeights

FORMAT_VERSION = 2  # 2: backbones name their pooled last features pre_logits
log = logging.getLogger(__name__)


def default_root() -> Path:
    """`$JAXTL_CACHE_DIR/features` (default `~/.cache/jaxtl/features`)."""
    return cache_dir() / "features"


def describe_backbone(model_name: str, weights: str | Path | None, backbone_kwargs: dict, dtype: str,
                      seed: int = 0) -> dict:
    """What identifies a backbone's features: name, build arguments, dtype and the weights' identity."""
    resolved = resolve_weights(model_name, weights)
    if isinstance(resolved, PretrainedWeights):
        identity: dict[str, Any] = {"id": resolved.id, "sha256": recorded_sha256(resolved)}
    elif resolved is None:
        identity = {"random_init_seed": seed}
    else:
        identity = {"file": str(resolved), "sha256": sha256_of(resolved)}
    return {"model": model_name, "kwargs": _plain(dict(backbone_kwargs)), "dtype": dtype, "weights": identity}


def _plain(value):
    """JSON-ready copy (tuples as lists, ConfigDicts as dicts) so equal settings give equal keys."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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


@dataclass(frozen=True)
class CacheEntry:
    """One split's cache folder and the description its key was made from."""

    path: Path
    description: dict

    def file(self, layer: str, pool: bool) -> Path:
        return feature_file(self.path, layer, pool)


def feature_file(directory: Path, layer: str, pool: bool) -> Path:
    return directory / f"{layer}.{'pooled' if pool else 'map'}.npy"


def cache_entry(backbone: dict, prep: Preprocessing, split: Split, root: str | Path | None = None) -> CacheEntry:
    description = {"format": FORMAT_VERSION, "backbone": backbone, "preprocessing": dataclasses.asdict(prep),
                   "examples": {"count": len(split), "sha256": split_fingerprint(split)}}
    key = hashlib.sha256(json.dumps(_plain(description), sort_keys=True).encode()).hexdigest()
    return CacheEntry(Path(root or default_root()) / key, description)


def _load(path: Path, count: int) -> np.ndarray | None:
    """The memory-mapped array at `path`, or None if it is missing or unusable (then it is recomputed)."""
    if not path.is_file():
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


def _remove_stale_temporaries(directory: Path, max_age_s: float = 86_400) -> None:
    """Deletes `.*.tmp` files a killed run left more than a day ago (a live writer's are younger)."""
    now = time.time()
    for tmp in directory.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
        except FileNotFoundError:
            pass


def write_features(
    directory: Path,
    backbone: nn.Module,
    variables: dict,
    split: Split,
    prep: Preprocessing,
    layers: Sequence[str],
    pool: bool,
    *,
    batch_size: int = 64,
    mesh: Mesh | None = None,
    progress: bool = False,
    desc: str = "extract",
    extra: dict[str, bytes] | None = None,
    workers: int = 0,
) -> None:
    """Extracts `layers` of `split` straight into `.npy` files in `directory` (memory-mapped while written), plus
    `labels.npy` and any `extra` files (name -> bytes); each file is renamed into place only when all are complete.

    With several processes every one computes (each decodes its slice of every batch, all receive all the
    features) and `jaxtl.atomic.publish` puts the files in place without two processes writing one file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    targets = {layer: feature_file(directory, layer, pool) for layer in layers}
    temporaries = {layer: temporary_beside(path) for layer, path in targets.items()}
    pairs = {temporaries[layer]: targets[layer] for layer in layers}
    try:
        def allocate(layer: str, shape: tuple[int, ...]) -> np.ndarray:
            return np.lib.format.open_memmap(temporaries[layer], mode="w+", dtype=np.float32, shape=shape)

        if layers:
            arrays = extract_features(backbone, variables, split, prep, layers, pool=pool, batch_size=batch_size,
                                      mesh=mesh, allocate=allocate, progress=progress, desc=desc, workers=workers)
            for array in arrays.values():
                array.flush()
            del arrays
        labels = temporary_beside(directory / "labels.npy")
        pairs[labels] = directory / "labels.npy"
        with open(labels, "wb") as f:
            np.save(f, np.asarray(split.labels, np.int32))
        for name, content in (extra or {}).items():
            tmp = temporary_beside(directory / name)
            tmp.write_bytes(content)
            pairs[tmp] = directory / name
        publish(pairs, str(directory))
    finally:
        for tmp in pairs:
            tmp.unlink(missing_ok=True)


def cached_features(
    entry: CacheEntry,
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
    found = {layer: _load(entry.file(layer, pool), count) for layer in layers}
    labels = _load(entry.path / "labels.npy", count)
    if labels is not None and not np.array_equal(labels, split.labels):
        labels = None
    # a file missing on any host is computed by all (extraction is a collective)
    missing = any_process([found[layer] is None for layer in layers] + [labels is None])
    missing, labels_missing = [layer for layer, miss in zip(layers, missing) if miss], missing[-1]
    if missing or labels_missing:
        log.info("feature cache miss: %s of %d examples -> %s", ", ".join(missing) or "labels", count, entry.path)
        entry.path.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(entry.path)
        description = (json.dumps(entry.description, indent=2) + "\n").encode()
        write_features(entry.path, backbone, variables, split, prep, missing, pool, batch_size=batch_size,
                       mesh=mesh, progress=progress, desc=desc, extra={"meta.json": description}, workers=workers)
        found = {layer: _load(entry.file(layer, pool), count) for layer in layers}
        labels = _load(entry.path / "labels.npy", count)
    else:
        log.info("feature cache hit: %s of %d examples <- %s", ", ".join(layers), count, entry.path)
    return found, np.asarray(labels)
