"""Named-layer features of a whole split in one forward pass per batch, batched and sharded over every device.

`extract_features(model, variables, split, prep, layers)` returns one array per layer, `(N, C)` pooled (global
average) or `(N, H, W, C)` full maps. The arrays come from an `allocate` callback, so the feature cache can hand
out memory-mapped files and a split's features never have to fit in RAM.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from jaxtl.data.folder import Split
from jaxtl.data.pipeline import batches, num_batches
from jaxtl.data.preprocess import Preprocessing
from jaxtl.sharding import global_batch, make_mesh

Allocate = Callable[[str, tuple[int, ...]], np.ndarray]


@functools.lru_cache(maxsize=16)
def make_extract_step(model: nn.Module, layers: tuple[str, ...], pool: bool, mesh: Mesh) -> Callable:
    """A jitted `step(variables, images) -> {layer: features}` (eval mode), pooled maps in float32; cached so
    that the splits of a dataset share one compilation."""

    def step(variables, images):
        outputs = model.apply(variables, images, train=False, layers=layers)
        return {name: (jnp.mean(x.astype(jnp.float32), axis=(1, 2)) if pool and x.ndim == 4 else x.astype(jnp.float32))
                for name, x in outputs.items()}

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(replicated, NamedSharding(mesh, P("data"))), out_shardings=replicated)


def extract_features(
    model: nn.Module,
    variables: dict,
    split: Split,
    prep: Preprocessing,
    layers: Sequence[str],
    *,
    pool: bool = True,
    batch_size: int = 64,
    mesh: Mesh | None = None,
    allocate: Allocate | None = None,
    progress: bool = False,
    desc: str = "extract",
) -> dict[str, np.ndarray]:
    """`{layer: (N, ...) float32 array}` for every example of `split`, in its order, with `prep`'s eval transform.

    Every process computes and receives the whole split's features (each decodes only its slice of a batch).
    `batch_size` is rounded up to a multiple of the number of devices.
    """
    if not layers:
        raise ValueError("no layers to extract; name at least one, e.g. ('pre_logits',)")
    mesh = mesh or make_mesh()
    batch_size = -(-batch_size // mesh.size) * mesh.size
    step = make_extract_step(model, tuple(layers), pool, mesh)
    allocate = allocate or (lambda name, shape: np.empty(shape, np.float32))
    replicated = jax.device_put(variables, NamedSharding(mesh, P()))
    out: dict[str, np.ndarray] = {}
    stream = batches(split, prep, batch_size, train=False, process_index=jax.process_index(),
                     process_count=jax.process_count())
    for i, batch in enumerate(tqdm(stream, total=num_batches(split, batch_size, False), desc=desc, leave=False,
                                   disable=not progress)):
        features = jax.device_get(step(replicated, global_batch({"images": batch["images"]}, mesh)["images"]))
        start = i * batch_size
        count = min(batch_size, len(split) - start)
        for name, value in features.items():
            if name not in out:
                out[name] = allocate(name, (len(split), *value.shape[1:]))
            out[name][start : start + count] = value[:count]
    return out
