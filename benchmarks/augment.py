"""Where augmentation policies should run: on the host per image (torchvision on PIL images, as a timm or
torchvision pipeline does in its workers) or on the device per batch (jaxtl's `Inputs` inside the jitted step),
side by side on `imagenet_sample`'s first images at 224 x 224, one core each way.

    python benchmarks/augment.py [--batch 64] [--iters 5]

Host: milliseconds of one core per image for RandAugment(2, 9), TrivialAugmentWide, ColorJitter(0.4, 0.4, 0.4)
and RandomErasing(0.25) (on the normalised tensor, as timm). Device: the jitted batch transform on this CPU per
image (everything the step adds: the policy, normalisation and erasing, minus normalisation alone), and XLA's
count of bytes it moves per image, which at an H100's ~3 TB/s bounds its cost on an accelerator. Prints a table
and a JSON line with `host_ms_per_image`, `device_cpu_ms_per_image`, `device_bytes_per_image` and
`accelerator_us_per_image_at_3tbs` (dicts by policy).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from jaxtl.core.preprocessing import Preprocessing  # noqa: E402
from jaxtl.data.augment import Policy  # noqa: E402
from jaxtl.train.steps import image_inputs  # noqa: E402

POLICIES = {
    "randaugment": (Policy("randaugment"), T.RandAugment(2, 9)),
    "trivialaugment": (Policy("trivialaugment"), T.TrivialAugmentWide()),
    "color_jitter": (Policy(color_jitter=0.4), T.ColorJitter(0.4, 0.4, 0.4)),
    "random_erasing": (Policy(random_erasing=0.25), None),
}


def _images(count: int) -> list[Image.Image]:
    root = Path(os.environ.get("JAXTL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    files = sorted((root / "imagenet_sample").rglob("*.JPEG"))[:count]
    return [Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC) for f in files]


def host_ms(images: list[Image.Image], transform, iters: int) -> float:
    """One core's milliseconds per image (median over `iters` passes)."""
    torch.set_num_threads(1)
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    erase = T.RandomErasing(0.25, value="random")
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        for image in images:
            if transform is None:
                erase(normalize(image))
            else:
                transform(image)
        times.append((time.perf_counter() - start) / len(images))
    return 1e3 * float(np.median(times))


def device(images: np.ndarray, policy: Policy, iters: int) -> tuple[float, float]:
    """(CPU milliseconds, bytes accessed) per image of the policy's part of the batch transform."""
    prep = Preprocessing(input_size=224)
    batch = {"images": jax.device_put(images)}
    results = []
    for inputs in (image_inputs(prep), image_inputs(prep, policy)):
        fn = jax.jit(lambda b, key, inputs=inputs: inputs(b, key))
        key = jax.random.key(0)
        compiled = fn.lower(batch, key).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        jax.block_until_ready(fn(batch, key))
        times = []
        for i in range(iters):
            start = time.perf_counter()
            jax.block_until_ready(fn(batch, jax.random.key(i)))
            times.append(time.perf_counter() - start)
        results.append((1e3 * float(np.median(times)), float(cost.get("bytes accessed", 0.0))))
    (base_ms, base_bytes), (ms, nbytes) = results
    return (ms - base_ms) / len(images), (nbytes - base_bytes) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    pil = _images(args.batch)
    array = np.stack([np.asarray(p) for p in pil])
    report = {"host_ms_per_image": {}, "device_cpu_ms_per_image": {}, "device_bytes_per_image": {},
              "accelerator_us_per_image_at_3tbs": {}}
    print(f"{'policy':16s} {'host ms/img':>12s} {'device (CPU) ms/img':>20s} {'device KB/img':>14s}")
    for name, (policy, transform) in POLICIES.items():
        h = host_ms(pil, transform, args.iters)
        d, nbytes = device(array, policy, args.iters)
        report["host_ms_per_image"][name] = round(h, 3)
        report["device_cpu_ms_per_image"][name] = round(d, 3)
        report["device_bytes_per_image"][name] = int(nbytes)
        report["accelerator_us_per_image_at_3tbs"][name] = round(nbytes / 3e12 * 1e6, 3)
        print(f"{name:16s} {h:12.3f} {d:20.3f} {nbytes / 1e3:14.0f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
