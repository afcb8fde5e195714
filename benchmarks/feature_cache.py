"""What the feature cache buys on ants/bees: a head epoch on cached features against a frozen-backbone epoch of
the full pipeline, and the wall time of whole linear-probe runs.

    JAXTL_DATA_DIR=../shared/data python benchmarks/feature_cache.py [--model efficientnet_lite0] [--skip-runs]

1. One epoch of the 245 training images, batch 32, both after a warm-up epoch (compiled): the full pipeline
   (decode, augment, frozen backbone forward, head update; `train_step` with every backbone group frozen)
   against a linear head trained by minibatches on the cached pooled features (target: >= 50x).
2. `run.py train --config configs/ants_bees.py` wall time, each a fresh process: with an empty feature cache
   (cold), again (warm), and with `features.cache=False` (the same linear probe through the image pipeline,
   10 augmented epochs), side by side.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import jaxtl
from jaxtl.config import load_config
from jaxtl.core.sharding import global_batch, make_mesh
from jaxtl.data.pipeline import Augment, batches
from jaxtl.features.extract import extract_features
from jaxtl.features.featureset import FeatureSet, feature_batches
from jaxtl.train.plan import data_source
from jaxtl.train.steps import FEATURES, step_for_rules
from jaxtl.transfer.optimizer import make_schedule
from jaxtl.transfer.strategies import make_phases
from jaxtl.weights.create import headless

REPO = Path(__file__).resolve().parents[1]


def pipeline_epoch_seconds(model_name: str, split, prep, batch_size: int) -> float:
    model, variables = jaxtl.create_model(model_name, "default", num_classes=2)
    mesh = make_mesh()
    rules = make_phases("linear_probe", 1, model.backbone.groups)[0].rules
    step, state = step_for_rules(model, variables, rules, make_schedule(0.1, 100, 0), mesh, weight_decay=1e-4,
                                 label_smoothing=0.1)
    seconds = []
    for epoch in range(2):  # the first epoch compiles
        start = time.perf_counter()
        for batch in batches(split, prep, batch_size, train=True, epoch=epoch, augment=Augment(crop_scale=(0.25, 1))):
            state, sums = step(state, global_batch(batch, mesh))
        jax.block_until_ready(sums)
        seconds.append(time.perf_counter() - start)
    return seconds[-1]


def cached_epoch_seconds(model_name: str, dataset, prep, batch_size: int) -> tuple[float, float]:
    """The same linear head, the same train step, on batches of cached features (`FEATURES` inputs)."""
    model, variables = jaxtl.create_model(model_name, "default", num_classes=2)
    backbone, backbone_variables = headless(model, variables)
    start = time.perf_counter()
    features = {name: extract_features(backbone, backbone_variables, split, prep, ("pre_logits",), batch_size=64)
                for name, split in dataset.splits.items()}
    extract_seconds = time.perf_counter() - start
    train = FeatureSet([features["train"]["pre_logits"]], dataset.splits["train"].labels)
    mesh = make_mesh()
    rules = make_phases("linear_probe", 1, model.backbone.groups)[0].rules
    step, state = step_for_rules(model, variables, rules, make_schedule(0.1, 100, 0), mesh, weight_decay=1e-4,
                                 label_smoothing=0.1, inputs=FEATURES)
    seconds = []
    for epoch in range(5):  # the first epoch compiles
        start = time.perf_counter()
        for batch in feature_batches(train, batch_size, train=True, epoch=epoch):
            state, sums = step(state, global_batch(batch, mesh))
        jax.block_until_ready(sums)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds[1:])), extract_seconds


def run_seconds(cache_dir: str, *overrides: str) -> float:
    env = dict(os.environ, JAXTL_CACHE_DIR=cache_dir)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "run.py"), "train", "--config", str(REPO / "configs/ants_bees.py"),
                        "--workdir", workdir, "--config.progress=False", *overrides], env=env, check=True,
                       capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-runs", action="store_true", help="only the epoch comparison")
    args = parser.parse_args()

    config = load_config(REPO / "configs/ants_bees.py")
    dataset = data_source(config).load()
    prep = jaxtl.get_preprocessing(args.model)
    train = dataset.splits["train"]
    print(f"{args.model}, ants/bees: {len(train)} train images, batch {args.batch_size}, "
          f"{jax.devices()[0].platform} x{jax.device_count()}")
    pipeline = pipeline_epoch_seconds(args.model, train, prep, args.batch_size)
    cached, extract = cached_epoch_seconds(args.model, dataset, prep, args.batch_size)
    print(f"one epoch, full pipeline, frozen backbone: {pipeline * 1000:10.1f} ms")
    print(f"one epoch, head on cached features:        {cached * 1000:10.1f} ms   ({pipeline / cached:,.0f}x faster)")
    print(f"extracting the features once (train + val): {extract:8.1f} s")
    if args.skip_runs:
        return
    with tempfile.TemporaryDirectory() as cache:
        cold = run_seconds(cache)
        warm = run_seconds(cache)
        pipeline_run = run_seconds(cache, "--config.features.cache=False")
    print("run.py train --config configs/ants_bees.py, wall seconds (fresh process each):")
    print(f"  cold feature cache: {cold:6.1f}")
    print(f"  warm feature cache: {warm:6.1f}")
    print(f"  no cache (10 augmented epochs through the backbone): {pipeline_run:6.1f}"
          f"   ({pipeline_run / cold:.1f}x cold, {pipeline_run / warm:.1f}x warm)")


if __name__ == "__main__":
    main()
