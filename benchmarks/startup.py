"""Startup on a large folder: listing, checking every image and fingerprinting the split (the feature and
decoded-image caches' key), for a generated folder of 100,000 small JPEGs, cold (nothing known) and warm (the
folder's manifest knows every unchanged file: one `stat` each).

    python benchmarks/startup.py [--images 100000] [--folder /tmp/jaxtl_startup]

The folder is generated once (10 classes of 48x48 JPEGs) and kept for later runs; the manifest and caches go to a
temporary JAXTL_CACHE_DIR, so the first timing is cold.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def generate(folder: Path, count: int, classes: int = 10) -> None:
    marker = folder / f".complete-{count}"
    if marker.exists():
        return
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 255, (classes, 3))

    def write(i: int) -> None:
        label = i % classes
        pixels = np.clip(palette[label] + np.random.default_rng(i).normal(0, 30, (48, 48, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"class{label}" / f"{i:06d}.jpg", quality=85)

    for label in range(classes):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, range(count)))
    marker.touch()


def startup_seconds(folder: Path) -> tuple[float, float, float]:
    from jaxtl.data.folder import folder_dataset
    from jaxtl.data.split import split_fingerprint

    start = time.perf_counter()
    dataset = folder_dataset(folder, val_fraction=0.1)
    loaded = time.perf_counter()
    for split in dataset.splits.values():
        split_fingerprint(split)
    return loaded - start, time.perf_counter() - loaded, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "jaxtl_startup"))
    args = parser.parse_args()
    folder = Path(args.folder)
    start = time.perf_counter()
    generate(folder, args.images)
    print(f"{args.images:,} JPEGs of 48x48 in {folder} (generated or found in {time.perf_counter() - start:.0f} s); "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["JAXTL_CACHE_DIR"] = cache
        print(f"{'':8}{'list + check images s':>24}{'fingerprint s':>16}{'startup s':>12}")
        for name in ("cold", "warm"):
            check, fingerprint, total = startup_seconds(folder)
            print(f"{name:<8}{check:>24.1f}{fingerprint:>16.1f}{total:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
