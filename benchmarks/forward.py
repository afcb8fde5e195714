"""Forward throughput (images/s, eval mode) of jaxtl backbones next to their PyTorch originals, same run.

    python benchmarks/forward.py [--batch-size 32] [--iters 5] [--models resnet18,resnet50,efficientnet_lite0,...]

The PyTorch side is torchvision's ResNets, VGG-16 and MobileNetV2, the `efficientnet-lite-pytorch` reference for
Lite0 and timm's ViT-S/16 and ViT-B/32; both run on whatever device each framework picks by default (CPU here,
GPU where one is visible to both).
Each model is timed after a warm-up call (which includes jit compilation, reported separately).
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
    model, variables = jaxtl.create_model(name)
    forward = jax.jit(lambda v, x: model.apply(v, x)[0])
    x = jnp.asarray(np.random.RandomState(0).randn(batch_size, size, size, 3).astype(np.float32))
    start = time.perf_counter()
    forward(variables, x).block_until_ready()
    compile_s = time.perf_counter() - start
    jax_s = _time(lambda: forward(variables, x).block_until_ready(), iters)

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
    return {"model": name, "jaxtl": batch_size / jax_s, "torch": batch_size / torch_s, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--models", default="resnet18,resnet50,efficientnet_lite0,vgg16,mobilenet_v2,vit_s16,vit_b32")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)); "
          f"torch {torch.__version__} on {'cuda' if torch.cuda.is_available() else 'cpu'} "
          f"({torch.get_num_threads()} threads); batch {args.batch_size}, 224x224, float32, eval")
    print(f"{'model':<20}{'jaxtl img/s':>12}{'torch img/s':>12}{'ratio':>8}{'jit s':>8}")
    for name in args.models.split(","):
        r = bench(name, args.batch_size, args.iters)
        print(f"{r['model']:<20}{r['jaxtl']:>12.1f}{r['torch']:>12.1f}{r['jaxtl'] / r['torch']:>8.2f}{r['compile_s']:>8.1f}",
              flush=True)


if __name__ == "__main__":
    main()
