"""The data-parallel layout every jitted step uses: a 1-D `data` mesh over all devices of all processes, the
batch split over it, everything else replicated; and summing a step's outputs over a split."""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
    """A 1-D `data` mesh over every device of every process."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices, ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the `data` axis."""
    return NamedSharding(mesh, P("data"))


def round_to_devices(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded up to a multiple of the number of devices (for evaluation and extraction, which pad)."""
    return -(-batch_size // mesh.size) * mesh.size


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's slice of the global batch, as global arrays sharded over the mesh."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def sum_over_batches(step: Callable[[dict], dict], batches: Iterable[dict], mesh: Mesh) -> dict | None:
    """The sum, on the host, of `step(global batch)` over `batches` (this process's slices); None if empty."""
    totals = None
    for batch in batches:
        sums = jax.device_get(step(global_batch(batch, mesh)))
        totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    return totals
