"""Input-pipeline throughput: images/s decoded and augmented (train) or resized and cropped (eval).

    JAXTL_DATA_DIR=../shared/data python benchmarks/input_pipeline.py [--batch-size 32] [--epochs 2]

On the ants/bees train split (245 JPEGs up to 2592x1944), at the default model's preprocessing.
"""

from __future__ import annotations

import argparse
import os
import time

import jaxtl
from jaxtl.data.folder import folder_dataset
from jaxtl.data.pipeline import batches
from jaxtl.data.sources import data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", default="efficientnet_lite0")
    args = parser.parse_args()
    dataset = folder_dataset(data_dir() / "hymenoptera_data")
    prep = jaxtl.get_preprocessing(args.model)
    print(f"{os.cpu_count()} CPUs; {prep.input_size}x{prep.input_size}; batch {args.batch_size}")
    for split, train in (("train", True), ("val", False)):
        start, count = time.perf_counter(), 0
        for epoch in range(args.epochs):
            for batch in batches(dataset.splits[split], prep, args.batch_size, train=train, epoch=epoch):
                count += int(batch["mask"].sum())
        seconds = time.perf_counter() - start
        print(f"{split:<6}({'decode + random resized crop + flip' if train else 'decode + resize + centre crop'}): "
              f"{count / seconds:.0f} images/s")


if __name__ == "__main__":
    main()
