"""What a training step keeps for its backward pass: the saved activations (residuals) of a full fine-tuning step,
per image, by dtype, from JAX's own saved-residuals analysis, and the compiled step's memory analysis.

    python benchmarks/step_memory.py [--models resnet50,efficientnet_lite0,vit_s16] [--batch-size 8]
        [--remat none,blocks] [--cpu-forms]

Prints a table (MiB of saved activations per image, the share kept in float32, and XLA's compiled temporary bytes)
and one JSON line per row with `model`, `dtype`, `batchnorm`, `remat`, `saved_mib_per_image`, `float32_share`:
float32, then bfloat16 with Flax's `nn.BatchNorm` (side by side) and with jaxtl's (`jaxtl.models.batchnorm`).
Residuals scale with the batch (parameters and their gradients do not), so per image = the residuals' bytes
minus what a batch of one keeps, over the batch minus one. Nothing runs on a device but the compilation. The
models trace the operations they use on an accelerator (`--cpu-forms`: those they use on a CPU, where depthwise
convolutions and max pooling have jaxtl's own gradients, which keep less).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import defaultdict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax._src.ad_checkpoint import saved_residuals  # JAX's own analysis (what print_saved_residuals prints)

import jaxtl
from jaxtl.core import compiler
from jaxtl.core.sharding import make_mesh
from jaxtl.models import layers
from jaxtl.train.steps import image_inputs, loss_and_metrics


def residual_bytes(model, variables, prep, batch: int) -> dict[str, int]:
    """Bytes of the residuals a full fine-tuning step's gradient keeps, by dtype, at `batch` images."""
    size = prep.input_size
    images = jnp.zeros((batch, size, size, 3), jnp.uint8)
    labels, mask = jnp.zeros(batch, jnp.int32), jnp.ones(batch, jnp.float32)
    inputs = image_inputs(prep)

    stats = {"batch_stats": variables["batch_stats"]} if "batch_stats" in variables else {}  # a ViT has none

    def loss(params):
        (logits, _), _ = model.apply({"params": params, **stats}, inputs({"images": images}), train=True,
                                     mutable=list(stats), rngs={"dropout": jax.random.key(0)})
        sums = loss_and_metrics(logits, labels, mask)
        return sums["loss"] / batch

    found = defaultdict(int)
    for aval, _ in saved_residuals(loss, variables["params"]):
        if hasattr(aval, "shape"):
            found[str(aval.dtype)] += int(np.prod(aval.shape)) * aval.dtype.itemsize
    return dict(found)


def per_image(model, variables, prep, batch: int) -> dict[str, float]:
    """Residual bytes per image, by dtype: the growth from one image to `batch` images, over `batch - 1`."""
    one, many = residual_bytes(model, variables, prep, 1), residual_bytes(model, variables, prep, batch)
    return {k: (many.get(k, 0) - one.get(k, 0)) / (batch - 1) for k in set(one) | set(many)}


def compiled_memory(model, variables, prep, batch: int) -> dict[str, int]:
    """XLA's memory analysis of the compiled train step (temporaries, arguments, outputs), bytes."""
    from jaxtl.train.steps import step_for_rules

    step, state = step_for_rules(model, variables, ((".*", 1.0),), optax.constant_schedule(1e-3), make_mesh(),
                                 inputs=image_inputs(prep))
    size = prep.input_size
    batch_arrays = {"images": jnp.zeros((batch, size, size, 3), jnp.uint8), "labels": jnp.zeros(batch, jnp.int32),
                    "mask": jnp.ones(batch, jnp.float32)}
    analysis = step.lower(state, batch_arrays).compile().memory_analysis()
    return {"temp": analysis.temp_size_in_bytes, "arguments": analysis.argument_size_in_bytes,
            "outputs": analysis.output_size_in_bytes}


@contextlib.contextmanager
def batchnorm_layer(which: str):
    """Models built inside use jaxtl's BatchNorm ("jaxtl") or Flax's `nn.BatchNorm` ("flax", what jaxtl used before:
    the side-by-side row)."""
    if which == "jaxtl":
        yield
        return
    original = layers.batch_norm
    layers.batch_norm = lambda momentum, epsilon, dtype, name: nn.BatchNorm(
        momentum=momentum, epsilon=epsilon, dtype=dtype, use_fast_variance=True, name=name)
    try:
        yield
    finally:
        layers.batch_norm = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,efficientnet_lite0,vit_s16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--remat", default="none", help="comma-separated model.kwargs.remat values to compare")
    parser.add_argument("--cpu-forms", action="store_true",
                        help="analyse the program a CPU runs (jaxtl's CPU depthwise and max-pool gradients) instead "
                             "of an accelerator's (XLA's native operations)")
    args = parser.parse_args()
    if not args.cpu_forms:
        layers.cpu_forms = lambda: False  # the models trace what they trace on a GPU or TPU
        compiler.compiler_options = lambda: None  # and XLA compiles them without jaxtl's CPU options
    print(f"| model | dtype | BatchNorm | remat | saved MiB / image | float32 share | compiled temp MiB "
          f"(batch {args.batch_size}) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    cases = [(jnp.float32, "jaxtl"), (jnp.bfloat16, "flax"), (jnp.bfloat16, "jaxtl")]
    for name in args.models.split(","):
        prep = jaxtl.get_preprocessing(name, None)
        for remat in args.remat.split(","):
            for dtype, norm in cases:
                kwargs = {} if remat == "none" else {"remat": remat}
                with batchnorm_layer(norm):
                    model, variables = jaxtl.create_model(name, None, 10, dtype=dtype, **kwargs)
                    by_dtype = per_image(model, variables, prep, args.batch_size)
                    memory = compiled_memory(model, variables, prep, args.batch_size)
                total = sum(by_dtype.values())
                f32 = by_dtype.get("float32", 0.0) / max(total, 1.0)
                row = {"model": name, "dtype": jnp.dtype(dtype).name, "batchnorm": norm, "remat": remat,
                       "saved_mib_per_image": round(total / 2**20, 1), "float32_share": round(f32, 3),
                       "compiled_temp_mib": round(memory["temp"] / 2**20, 1)}
                rows.append(row)
                print(f"| {name} | {row['dtype']} | {norm} | {remat} | {row['saved_mib_per_image']} | {f32:.0%} | "
                      f"{row['compiled_temp_mib']} |", flush=True)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
