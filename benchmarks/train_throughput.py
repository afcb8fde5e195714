"""Training and inference throughput (images/s): ResNet-50 and EfficientNet-Lite0 (and ResNet-18 on CPU), full
fine-tuning steps (SGD-momentum) and forward passes, float32 and bfloat16, on whatever device JAX sees.

    JAXTL_DATA_DIR=../shared/data python benchmarks/train_throughput.py [--batch-size 16] [--iters 5]
        [--models resnet50,efficientnet_lite0] [--workers 0] [--no-torch] [--no-end-to-end]

- step only: the batch (uint8, like the pipeline's) is already on the device; the step normalises it.
- end to end: batches from the input pipeline as the training loop runs them: put on the mesh by a background
  thread while the previous step runs, the host waiting only after the last of 4 x `--iters` steps. By default
  ImageNet-size JPEGs (`--data`, the shared `imagenet_sample`) decoded per step, `--decoded` from the decoded-image
  cache at the input size; `--workers` decoding processes (0: threads).
- On a CPU, the same steps in PyTorch (torchvision's ResNets, the efficient-lite-pytorch reference for Lite0, SGD,
  random init) run side by side, each PyTorch call right after the jaxtl call it is compared with, and the ratio
  jaxtl / PyTorch is printed (above 1: jaxtl faster).
Every figure is the median of `--iters` timed calls after one warm-up call (compilation reported apart).
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxtl
from jaxtl.core.compiler import jit
from jaxtl.core.paths import data_dir
from jaxtl.core.sharding import global_batch, make_mesh, prefetch_to_mesh
from jaxtl.train.steps import image_inputs, step_for_rules


def _median_seconds(fn, iters: int, reference=None) -> tuple[float, float, float]:
    """(median seconds of `fn`, its first call's seconds, median seconds of `reference`): with a reference, the two
    are called in turn, so that a slow spell of a shared machine falls on both sides of the ratio."""
    start = time.perf_counter()
    fn()
    compile_s = time.perf_counter() - start
    if reference is not None:
        reference()
    times, reference_times = [], []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if reference is not None:
            start = time.perf_counter()
            reference()
            reference_times.append(time.perf_counter() - start)
    return float(np.median(times)), compile_s, float(np.median(reference_times)) if reference_times else float("nan")


def jax_figures(name: str, batch_size: int, iters: int, dtype, stream=None, reference: dict | None = None) -> dict:
    """Seconds per call, as images/s; with `reference` (PyTorch's `train` and `forward` callables) timed in turn
    with the same calls, as `torch_train` and `torch_forward`."""
    reference = reference or {}
    model, variables = jaxtl.create_model(name, num_classes=1000, dtype=dtype)
    prep = jaxtl.get_preprocessing(name)
    mesh = make_mesh()
    step, state = step_for_rules(model, variables, ((".*", 1.0),), optax.constant_schedule(1e-3), mesh,
                                 weight_decay=1e-4, inputs=image_inputs(prep))
    rng = np.random.RandomState(0)
    size = prep.input_size
    batch = global_batch({"images": rng.randint(0, 256, (batch_size, size, size, 3)).astype(np.uint8),
                          "labels": rng.randint(0, 1000, batch_size).astype(np.int32),
                          "mask": np.ones(batch_size, np.float32)}, mesh)
    holder = {"state": state}

    def train():
        holder["state"], sums = step(holder["state"], batch)
        sums["loss"].block_until_ready()

    inputs = image_inputs(prep)
    forward = jit(lambda v, b: model.apply(v, inputs(b))[0])

    def infer():
        forward(variables, batch).block_until_ready()

    out = {}
    out["train"], out["train_compile"], out["torch_train"] = _median_seconds(train, iters, reference.get("train"))
    out["forward"], out["forward_compile"], out["torch_forward"] = _median_seconds(infer, iters,
                                                                                  reference.get("forward"))
    if stream is not None:  # as the loop runs: batches put on the mesh ahead, the host waits once at the end
        prefetched = prefetch_to_mesh(stream, mesh)

        def steps(count: int) -> float:
            start = time.perf_counter()
            for _ in range(count):
                holder["state"], sums = step(holder["state"], next(prefetched))
            sums["loss"].block_until_ready()
            return time.perf_counter() - start

        steps(2)  # the pipeline's start-up and its first batches
        out["end_to_end"] = steps(4 * iters) / (4 * iters)
        prefetched.close()
    return {k: batch_size / v if not k.endswith("compile") else v for k, v in out.items()}


def torch_steps(name: str, batch_size: int) -> dict:
    """PyTorch's training step and forward pass of the same model, as callables."""
    import torch
    import torchvision

    if name == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    else:
        model = getattr(torchvision.models, name)()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(batch_size, 3, 224, 224), torch.randint(0, 1000, (batch_size,))

    def train():
        model.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    def infer():
        model.eval()
        with torch.inference_mode():
            model(x)

    return {"train": train, "forward": infer}


def pipeline_stream(name: str, batch_size: int, workers: int, data: str, decoded: bool, cache: str):
    """Training batches of `data` (its train split, else its one split) without end: JPEGs decoded per step, or the
    decoded-image cache at the input size (`decoded`)."""
    from jaxtl.data.decoded import decoded_split
    from jaxtl.data.pipeline import batches
    from jaxtl.features.api import image_splits

    prep = jaxtl.get_preprocessing(name)
    splits, _ = image_splits(data)
    split = splits.get("train", next(iter(splits.values())))
    if decoded:
        split = decoded_split(split, prep, Path(cache), side=prep.input_size)
    return itertools.chain.from_iterable(
        batches(split, prep, batch_size, train=True, epoch=10 * e, epochs=10, workers=workers)
        for e in itertools.count())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU, 256 on an accelerator")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--models", default=None, help="default resnet50,efficientnet_lite0 (+ resnet18 on CPU)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--data", default=str(data_dir() / "imagenet_sample"), help="images for end to end")
    parser.add_argument("--decoded", action="store_true", help="end to end from the decoded cache (input size)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-end-to-end", action="store_true")
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    cpu = platform == "cpu"
    batch_size = args.batch_size or (16 if cpu else 256)
    default_models = "resnet18,resnet50,efficientnet_lite0" if cpu else "resnet50,efficientnet_lite0"
    models = (args.models or default_models).split(",")
    compare = cpu and not args.no_torch
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind} ({platform}); "
          f"{os.cpu_count()} CPUs; batch {batch_size}, 224x224, full fine-tuning (SGD-momentum); images/s, "
          f"median of {args.iters}")
    header = f"{'model':<20}{'dtype':<10}{'train step':>12}{'end to end':>12}{'forward':>10}{'compile s':>11}"
    print(header + (f"{'torch train':>13}{'ratio':>7}{'torch fwd':>11}{'ratio':>7}" if compare else ""))
    with tempfile.TemporaryDirectory() as cache:
        for name in models:
            reference = torch_steps(name, batch_size) if compare else None
            for dtype in (jnp.float32, jnp.bfloat16):
                stream = None if args.no_end_to_end else pipeline_stream(name, batch_size, args.workers, args.data,
                                                                         args.decoded, cache)
                r = jax_figures(name, batch_size, args.iters, dtype, stream,
                                reference if dtype == jnp.float32 else None)
                line = (f"{name:<20}{jnp.dtype(dtype).name:<10}{r['train']:>12.1f}"
                        f"{r.get('end_to_end', float('nan')):>12.1f}{r['forward']:>10.1f}{r['train_compile']:>11.1f}")
                if reference and dtype == jnp.float32:
                    line += (f"{r['torch_train']:>13.1f}{r['train'] / r['torch_train']:>7.2f}"
                             f"{r['torch_forward']:>11.1f}{r['forward'] / r['torch_forward']:>7.2f}")
                print(line, flush=True)


if __name__ == "__main__":
    main()
