"""Forward throughput (images/s, eval mode) of jaxtl backbones next to their PyTorch originals, same run.

    python benchmarks/forward.py [--batch-size 32] [--iters 5] [--models resnet18,resnet50,efficientnet_lite0,...]

The PyTorch side is torchvision's ResNets, VGG-16 and MobileNetV2, the `efficientnet-lite-pytorch` reference for
Lite0 and timm's ViT-S/16 and ViT-B/32; both run on whatever device each framework picks by default (CPU here,
GPU where one is visible to both).
jaxtl runs each model in float32 and in bfloat16 (convolutions and matmuls in bf16, parameters float32: what an
accelerator runs; XLA:CPU computes bf16 as float32, so on a CPU that column is no faster). Each model is timed after
a warm-up call (which includes jit compilation, reported separately: the bf16 model's).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

import jaxtl
from jaxtl.core.compiler import jit

_TIMM = {"vit_s16": "vit_small_patch16_224", "vit_b32": "vit_base_patch32_224", "vit_b16": "vit_base_patch16_224",
         "vit_ti16": "vit_tiny_patch16_224"}


def _torch_model(name: str) -> torch.nn.Module:
    if name == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if name in _TIMM:
        import timm

        return timm.create_model(_TIMM[name], pretrained=False)
    return getattr(torchvision.models, name)()


def _time(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def bench(name: str, batch_size: int, iters: int, size: int = 224) -> dict:
    x = jnp.asarray(np.random.RandomState(0).randn(batch_size, size, size, 3).astype(np.float32))
    figures = {}
    for dtype in (jnp.float32, jnp.bfloat16):  # bf16: convolutions and matmuls in bf16, parameters float32
        model, variables = jaxtl.create_model(name, dtype=dtype)
        forward = jit(lambda v, x, model=model: model.apply(v, x)[0])
        start = time.perf_counter()
        forward(variables, x).block_until_ready()
        compile_s = time.perf_counter() - start
        figures[jnp.dtype(dtype).name] = batch_size / _time(lambda: forward(variables, x).block_until_ready(), iters)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = _torch_model(name).eval().to(device)
    xt = torch.randn(batch_size, 3, size, size, device=device)

    def torch_step():
        with torch.inference_mode():
            reference(xt)
        if device == "cuda":
            torch.cuda.synchronize()

    torch_step()
    torch_s = _time(torch_step, iters)
    return {"model": name, "jaxtl": figures["float32"], "jaxtl_bf16": figures["bfloat16"],
            "torch": batch_size / torch_s, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--models", default="resnet18,resnet50,efficientnet_lite0,vgg16,mobilenet_v2,vit_s16,vit_b32")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)); "
          f"torch {torch.__version__} on {'cuda' if torch.cuda.is_available() else 'cpu'} "
          f"({torch.get_num_threads()} threads); batch {args.batch_size}, 224x224, eval; ratio: jaxtl float32 over "
          f"torch float32")
    print(f"{'model':<20}{'jaxtl img/s':>12}{'jaxtl bf16':>12}{'torch img/s':>12}{'ratio':>8}{'jit s':>8}")
    for name in args.models.split(","):
        r = bench(name, args.batch_size, args.iters)
        print(f"{r['model']:<20}{r['jaxtl']:>12.1f}{r['jaxtl_bf16']:>12.1f}{r['torch']:>12.1f}"
              f"{r['jaxtl'] / r['torch']:>8.2f}{r['compile_s']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
