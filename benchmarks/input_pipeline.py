"""Input-pipeline throughput on ImageNet-size JPEGs: the training path (decode, random-resized crop, uint8 batches)
with 1 and 2 worker processes and with reader threads, side by side with torchvision's `ImageFolder` loader and
`RandomResizedCrop` in one thread; then the decoded-image cache, and evaluation.

    JAXTL_DATA_DIR=../shared/data python benchmarks/input_pipeline.py [--data DIR] [--model efficientnet_lite0]
        [--epochs 2]

`--data` defaults to `$JAXTL_DATA_DIR/imagenet_sample` (1000 ImageNet validation JPEGs, median 500x375); a folder of
class folders uses its train split. Batch 32, images/s after the stream's first batch (worker start-up reported
apart). torchvision's path is what its `ImageFolder` + `RandomResizedCrop` + `RandomHorizontalFlip` does for one
image (`pil_loader`: open, convert to RGB) with the model's interpolation (as jaxtl resizes; its default bilinear
another row), ending in a uint8 tensor (`PILToTensor`, the batches jaxtl ships; with
`ToTensor`'s float conversion too, another row). jaxtl's path for one example runs in the same thread, each image
through every path in turn (a slow spell of a shared machine then falls on all of them alike): `per_core_img_s` in
the last line, which is JSON, beside `torchvision_one_thread_img_s` and
`per_core_vs_torchvision` (target >= 1.2); then `batches` with 1 and 2 worker processes of one decoding thread each
(`scaling_2_workers`, 2 over 1; target >= 1.6), reader threads, and the decoded cache.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import jaxtl
from jaxtl.core.paths import data_dir
from jaxtl.data.decoded import decoded_split
from jaxtl.data.pipeline import Augment, LoadExample, batches
from jaxtl.features.api import image_splits


def throughput(split, prep, train: bool, workers: int, epochs: int, batch_size: int = 32, threads: int = 0
               ) -> tuple[float, float]:
    """(images/s after the first batch, seconds to the first batch)."""
    start = time.perf_counter()
    stream = batches(split, prep, batch_size, train=train, epochs=epochs if train else 1, workers=workers,
                     augment=Augment(), threads=threads)
    first = next(stream)
    startup, begin, count = time.perf_counter() - start, time.perf_counter(), 0
    for batch in stream:
        count += int(batch["mask"].sum())
    del first
    return count / (time.perf_counter() - begin), startup


def one_thread_side_by_side(split, prep, epochs: int) -> dict[str, float]:
    """images/s of jaxtl's training path for one example (`LoadExample`: decode at the DCT scale the crop allows,
    crop, resize) and of torchvision's `ImageFolder` + `RandomResizedCrop` path (`pil_loader`, crop, flip, a uint8
    tensor) with the model's interpolation, its default bilinear, and `ToTensor`'s float conversion: each image
    through each path in turn (each path first as often as the others), in this thread, so that a slow spell of a
    shared machine falls on all alike."""
    import torch
    from torchvision import transforms
    from torchvision.datasets.folder import pil_loader

    torch.set_num_threads(1)

    def torchvision(interpolation: str, last) -> transforms.Compose:
        mode = getattr(transforms.InterpolationMode, interpolation.upper())
        return transforms.Compose([transforms.RandomResizedCrop(prep.input_size, interpolation=mode),
                                   transforms.RandomHorizontalFlip(), last])

    load = LoadExample(split, prep, Augment(), seed=0, train=True)
    paths = {"jaxtl": lambda epoch, index, path: load.map(np.array([epoch, index]))}
    for name, interpolation, last in (("torchvision", prep.interpolation, transforms.PILToTensor()),
                                      ("torchvision_bilinear", "bilinear", transforms.PILToTensor()),
                                      ("torchvision_float", prep.interpolation, transforms.ToTensor())):
        if name != "torchvision_bilinear" or prep.interpolation != "bilinear":
            paths[name] = lambda epoch, index, path, transform=torchvision(interpolation, last): transform(
                pil_loader(path))
    for run in paths.values():
        run(0, 0, str(split.files[0]))  # warm-up
    seconds, names = dict.fromkeys(paths, 0.0), list(paths)
    for epoch in range(epochs):
        for index, path in enumerate(str(f) for f in split.files):
            for turn in range(len(names)):  # each path first as often as the others
                name = names[(index + turn) % len(names)]
                start = time.perf_counter()
                paths[name](epoch, index, path)
                seconds[name] += time.perf_counter() - start
    seconds.setdefault("torchvision_bilinear", seconds["torchvision"])
    return {name: epochs * len(split) / s for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(data_dir() / "imagenet_sample"))
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    splits, _ = image_splits(args.data)
    split = splits.get("train", next(iter(splits.values())))
    prep = jaxtl.get_preprocessing(args.model)
    sizes = [image_size(f) for f in split.files[:200]]
    print(f"{cores} CPUs; {len(split)} images from {args.data} (median {int(np.median([s[0] for s in sizes]))}x"
          f"{int(np.median([s[1] for s in sizes]))}); {args.model} preprocessing ({prep.input_size}x{prep.input_size},"
          f" {prep.interpolation}); batch 32; images/s after the first batch")
    rates = one_thread_side_by_side(split, prep, args.epochs)
    one, tv, tv_bilinear = rates["jaxtl"], rates["torchvision"], rates["torchvision_bilinear"]
    print("| path | images/s | start-up s |\n|---|---|---|")
    print(f"| torchvision ImageFolder + RandomResizedCrop ({prep.interpolation}, as jaxtl), 1 thread (uint8 tensors) "
          f"| {tv:.0f} | |")
    if prep.interpolation != "bilinear":
        print(f"| torchvision, its default bilinear, 1 thread (uint8 tensors) | {tv_bilinear:.0f} | |")
    print(f"| torchvision, 1 thread, ToTensor (float) | {rates['torchvision_float']:.0f} | |")
    print(f"| jaxtl JPEG train path, 1 thread (one core; each image through each path in turn) | {one:.0f} | |",
          flush=True)
    figures = {}
    for workers in (1, 2):  # one decoding thread in each worker process
        rate, startup = throughput(split, prep, True, workers, args.epochs, threads=1)
        figures[workers] = rate
        print(f"| jaxtl JPEG train path, {workers} worker process{'es' if workers > 1 else ''}, 1 thread each | "
              f"{rate:.0f} | {startup:.1f} |", flush=True)
    figures[0], startup = throughput(split, prep, True, 0, args.epochs)
    print(f"| jaxtl JPEG train path, reader threads (2 per core) | {figures[0]:.0f} | {startup:.1f} |", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        cached = decoded_split(split, prep, Path(cache))
        prepare = time.perf_counter() - start
        from_cache, _ = throughput(cached, prep, True, 0, 2 * args.epochs)
        capped = decoded_split(split, prep, Path(cache), side=prep.input_size)
        from_capped, _ = throughput(capped, prep, True, 0, 2 * args.epochs)
        stored = {name: (Path(s.directory) / "pixels.bin").stat().st_size / len(split) / 1e3
                  for name, s in (("resize", cached), ("input", capped))}
    print(f"| jaxtl decoded cache (shorter side {prep.resize_size}, {stored['resize']:.0f} KB/image, prepared in "
          f"{prepare:.1f} s), threads | {from_cache:.0f} | |")
    print(f"| jaxtl decoded cache at the input size ({prep.input_size}, {stored['input']:.0f} KB/image), threads | "
          f"{from_capped:.0f} | |")
    evaluation, _ = throughput(split, prep, False, 0, 1)
    print(f"| jaxtl evaluation (decode, resize, centre crop), threads | {evaluation:.0f} | |")
    result = {"cores": cores, "data": args.data, "per_core_img_s": round(one, 1),
              "torchvision_one_thread_img_s": round(tv, 1), "per_core_vs_torchvision": round(one / tv, 2),
              "torchvision_bilinear_img_s": round(tv_bilinear, 1), "interpolation": prep.interpolation,
              "one_worker_img_s": round(figures[1], 1), "two_workers_img_s": round(figures[2], 1),
              "scaling_2_workers": round(figures[2] / figures[1], 2), "threads_img_s": round(figures[0], 1),
              "cached_img_s": round(from_cache, 1), "cached_at_input_size_img_s": round(from_capped, 1),
              "cached_kb_per_image": round(stored["resize"], 1),
              "cached_at_input_size_kb_per_image": round(stored["input"], 1), "eval_img_s": round(evaluation, 1)}
    print(json.dumps(result))


def image_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


if __name__ == "__main__":
    main()
