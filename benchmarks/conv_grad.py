"""The 3x3 convolution's weight gradient on this CPU, op by op: XLA's as jaxtl compiles it (its own convolution
kernels, `jaxtl.core.compiler`) and with XLA's default options (a YNNPACK fusion), against the same gradient written
as matrix products (9 shifted products, and one im2col product) that a custom VJP could use, and PyTorch's (oneDNN)
side by side, at the shapes of a ResNet's 3x3 layers (batch 16, NHWC, float32).

    python benchmarks/conv_grad.py [--iters 5]

Prints a table of milliseconds (median of `--iters` after a warm-up) and one JSON line per shape with `shape`,
`xla_ms`, `xla_ynnpack_ms`, `shifted_ms`, `im2col_ms`, `torch_ms` and `best_matmul_vs_xla` (above 1: the matmul
form is faster than jaxtl's, and worth a custom VJP). See README, "Measured".
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.core.compiler import jit

SHAPES = [(16, 56, 64, 64, 1), (16, 28, 128, 128, 1), (16, 14, 256, 256, 1), (16, 7, 512, 512, 1),
          (16, 56, 128, 128, 2)]  # (batch, side, in channels, out channels, stride)


def _median_ms(fn, iters: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _conv(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), [(1, 1), (1, 1)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def xla_weight_grad(x, w, dy, stride):
    return jax.vjp(lambda w: _conv(x, w, stride), w)[1](dy)[0]


def _shifts(x, out_side: int, stride: int):
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    n, c = x.shape[0], x.shape[-1]
    end = (out_side - 1) * stride + 1
    return [jax.lax.slice(padded, (0, i, j, 0), (n, i + end, j + end, c), (1, stride, stride, 1))
            for i in range(3) for j in range(3)]


def shifted_weight_grad(x, w, dy, stride):
    """dW[i, j] = shift(x, i, j)^T dy, one product per kernel position."""
    flat = dy.reshape(-1, dy.shape[-1])
    rows = [jax.lax.dot_general(s.reshape(-1, x.shape[-1]), flat, (((0,), (0,)), ((), ())))
            for s in _shifts(x, dy.shape[1], stride)]
    return jnp.stack(rows).reshape(w.shape)


def im2col_weight_grad(x, w, dy, stride):
    """The 9 shifts side by side as one (pixels, 9 C_in) matrix, times dy."""
    columns = jnp.concatenate(_shifts(x, dy.shape[1], stride), axis=-1).reshape(-1, 9 * x.shape[-1])
    return jax.lax.dot_general(columns, dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ()))).reshape(w.shape)


def torch_weight_grad_ms(shape, iters: int) -> float:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    n, side, cin, cout, stride = shape
    out = (side - 1) // stride + 1
    x = torch.randn(n, cin, side, side).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(n, cout, out, out).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 3, 3)
    return _median_ms(lambda: torch.ops.aten.convolution_backward(
        dy, x, w, None, (stride, stride), (1, 1), (1, 1), False, (0, 0), 1, (False, True, False)), iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}; 3x3 weight gradient, ms (median of {args.iters})")
    print("| batch, side, C_in, C_out, stride | XLA (jaxtl) | XLA (YNNPACK) | 9 shifted matmuls | im2col matmul "
          "| PyTorch (oneDNN) |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        n, side, cin, cout, stride = shape
        out = (side - 1) // stride + 1
        x = jnp.asarray(rng.normal(size=(n, side, side, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
        dy = jnp.asarray(rng.normal(size=(n, out, out, cout)), jnp.float32)
        figures, reference = {}, None
        for name, fn, compile_with in (("xla", xla_weight_grad, jit), ("xla_ynnpack", xla_weight_grad, jax.jit),
                                       ("shifted", shifted_weight_grad, jit), ("im2col", im2col_weight_grad, jit)):
            jitted = compile_with(fn, static_argnums=3)
            result = np.asarray(jitted(x, w, dy, stride))
            if reference is None:
                reference = result
            else:  # the same gradient, or the figure means nothing
                np.testing.assert_allclose(result, reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max())
            figures[name] = _median_ms(lambda: jitted(x, w, dy, stride), args.iters)
        try:
            figures["torch"] = torch_weight_grad_ms(shape, args.iters)
        except ImportError:
            figures["torch"] = float("nan")
        print(f"| {n}, {side}, {cin}, {cout}, {stride} | {figures['xla']:.1f} | {figures['xla_ynnpack']:.1f} | "
              f"{figures['shifted']:.1f} | "
              f"{figures['im2col']:.1f} | {figures['torch']:.1f} |", flush=True)
        best = min(figures["shifted"], figures["im2col"])
        print(json.dumps({"shape": list(shape), **{f"{k}_ms": round(v, 2) for k, v in figures.items()},
                          "best_matmul_vs_xla": round(figures["xla"] / best, 2)}), flush=True)


if __name__ == "__main__":
    main()
