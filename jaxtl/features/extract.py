"""Named-layer features of a whole split in one forward pass per batch, batched and sharded over every device.

`extract_features(backbone, variables, split, prep, layers)` returns one array per layer, `(N, C)` pooled (global
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
from jax.sharding import Mesh
from tqdm import tqdm

from jaxtl.core.compiler import jit
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.sharding import batch_sharded, global_batch, make_mesh, replicated, round_to_devices
from jaxtl.data.pipeline import batches, num_batches
from jaxtl.data.preprocess import normalize
from jaxtl.data.split import Split
from jaxtl.models.classifier import check_features
from jaxtl.models.layers import global_pool

Allocate = Callable[[str, tuple[int, ...]], np.ndarray]


@functools.lru_cache(maxsize=16)
def make_extract_step(backbone: nn.Module, layers: tuple[str, ...], pool: bool, mesh: Mesh,
                      prep: Preprocessing) -> Callable:
    """A jitted `step(variables, uint8 images) -> {layer: features}` (normalised on the device, eval mode),
    pooled maps in float32; cached so that the splits of a dataset share one compilation."""

    def step(variables, images):
        features = backbone.apply(variables, normalize(images, prep, jnp), train=False)
        return {name: global_pool(features[name]) if pool else features[name].astype(jnp.float32)
                for name in layers}

    return jit(step, in_shardings=(replicated(mesh), batch_sharded(mesh)), out_shardings=replicated(mesh))


def extract_features(
    backbone: nn.Module,
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
    workers: int = 0,
) -> dict[str, np.ndarray]:
    """`{layer: (N, ...) float32 array}` of the backbone's named features for every example of `split`, in its
    order, with `prep`'s eval transform; maps are global-average pooled unless `pool=False`.

    Every process computes and receives the whole split's features (each decodes only its slice of a batch).
    `batch_size` is rounded up to a multiple of the number of devices.
    """
    layers = check_features(backbone, layers, "layers")
    mesh = mesh or make_mesh()
    batch_size = round_to_devices(batch_size, mesh)
    step = make_extract_step(backbone, layers, pool, mesh, prep)
    allocate = allocate or (lambda name, shape: np.empty(shape, np.float32))
    on_devices = jax.device_put(variables, replicated(mesh))
    out: dict[str, np.ndarray] = {}
    stream = batches(split, prep, batch_size, train=False, workers=workers)
    for i, batch in enumerate(tqdm(stream, total=num_batches(split, batch_size, False), desc=desc, leave=False,
                                   disable=not progress)):
        features = jax.device_get(step(on_devices, global_batch({"images": batch["images"]}, mesh)["images"]))
        start = i * batch_size
        count = min(batch_size, len(split) - start)
        for name, value in features.items():
            if name not in out:
                out[name] = allocate(name, (len(split), *value.shape[1:]))
            out[name][start : start + count] = value[:count]
    return out
