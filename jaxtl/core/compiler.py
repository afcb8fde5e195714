"""How jaxtl compiles the programs that run a model: `jit` is `jax.jit` plus the XLA options chosen for the
backend.

On a CPU, XLA hands convolutions, dots and reductions to YNNPACK fusions by default. Its convolutions (forward and
both gradients) measured up to 2x slower here than XLA's own convolution kernels (a 3x3, 64-channel layer at 56x56,
batch 16: forward 40 ms against 22, PyTorch's oneDNN 21; `benchmarks/conv_grad.py` for the weight gradient), while
its dots and reductions are the faster choice. So jaxtl's CPU programs keep YNNPACK for dots and reductions only.
The same compiled training step with XLA's defaults and with these options, side by side: ResNet-18 1.72 -> 1.42 s,
ResNet-50 4.32 -> 3.56 s, EfficientNet-Lite0 1.49 -> 1.39 s, MobileNetV2 and ViT-S/16 within 2% (batch 16). An
`XLA_FLAGS` that sets the option itself wins; a jaxlib that does not know the option compiles with XLA's
defaults."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax

FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {FUSIONS: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _options(backend: str, xla_flags: str) -> tuple[tuple[str, str], ...]:
    if backend != "cpu" or FUSIONS in xla_flags:
        return ()
    try:  # a jaxlib without the option (or its values) says so at the first compilation
        jax.jit(lambda x: x, compiler_options=CPU_OPTIONS).lower(0.0).compile()
    except jax.errors.JaxRuntimeError:
        return ()
    return tuple(CPU_OPTIONS.items())


def compiler_options() -> dict[str, str] | None:
    """The XLA options jaxtl compiles a model's programs with on this backend (None: XLA's defaults)."""
    return dict(_options(jax.default_backend(), os.environ.get("XLA_FLAGS", ""))) or None


def jit(fun: Callable, **kwargs: Any) -> Callable:
    """`jax.jit(fun, **kwargs)` compiled with `compiler_options()`."""
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
