"""`extract_to_folder`: what `run.py extract` does, callable from Python."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxtl.core.atomic import write_json_atomic
from jaxtl.core.errors import MissingFileError
from jaxtl.core.processes import is_main
from jaxtl.data.folder import folder_dataset, list_images
from jaxtl.data.split import Split
from jaxtl.features.cache import extract_to_directory, feature_file
from jaxtl.weights.create import create_backbone, get_preprocessing, resolve_weights


def image_splits(path: str | Path, exif: bool = True) -> tuple[dict[str, Split], tuple[str, ...]]:
    """The splits of a folder to extract: its `train`/`val`/`test` folders, else everything as one split `all`
    (labelled by class sub-folder, or -1 for a folder of unlabelled images). Returns `(splits, class_names)`."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"data folder '{path}' does not exist")
    if any(d.is_dir() and not d.name.startswith(".") for d in path.iterdir()):
        dataset = folder_dataset(path, val_fraction=0.0, test_fraction=0.0, exif=exif)
        has_split_folders = any((path / name).is_dir() for name in ("train", "training"))
        splits = dataset.splits if has_split_folders else {"all": dataset.splits["train"]}
        return splits, dataset.class_names
    files = list_images(path)
    if not files:
        raise MissingFileError(f"no image files found in '{path}'")
    return {"all": Split(tuple(files), np.full(len(files), -1, np.int32), exif=exif)}, ()


def extract_to_folder(
    model_name: str,
    weights: str | Path | None,
    data: str | Path,
    layers: Sequence[str],
    out: str | Path,
    *,
    pool: bool = True,
    input_size: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    workers: int = 0,
    exif: bool = True,
) -> dict:
    """Writes `out/<split>/<layer>.<pooled|map>.npy` (float32, rows in `files.txt` order), `labels.npy` and
    `files.txt` for every split of `data`, then `out/meta.json` describing them; returns the meta. Every process of
    a multi-process job takes part; each file is written once (`jaxtl.atomic.publish`)."""
    weights = resolve_weights(model_name, weights)
    backbone, variables = create_backbone(model_name, weights)
    prep = get_preprocessing(model_name, weights)
    prep = prep.with_input_size(input_size) if input_size else prep
    splits, class_names = image_splits(data, exif)
    out = Path(out)
    shapes = {}
    for name, split in splits.items():
        folder = out / name
        files = "".join(f"{f}\n" for f in split.files).encode()
        extract_to_directory(folder, backbone, variables, split, prep, layers, pool, {"files.txt": files},
                             batch_size=batch_size, progress=progress, desc=f"extract {name}", workers=workers)
        shapes[name] = {layer: list(np.load(folder / feature_file(layer, pool), mmap_mode="r").shape)
                        for layer in layers}
    meta = {"model": model_name, "weights": None if weights is None else weights.name, "layers": list(layers),
            "pooled": pool, "preprocessing": dataclasses.asdict(prep), "exif_orientation": exif,
            "classes": list(class_names),
            "splits": {name: len(split) for name, split in splits.items()}, "shapes": shapes}
    if is_main():
        write_json_atomic(out / "meta.json", meta)
    return meta
