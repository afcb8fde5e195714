"""The data-parallel layout every jitted step uses: a 1-D `data` mesh over all devices of all processes."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
    """A 1-D `data` mesh over every device of every process."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices, ("data",))


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's slice of the global batch, as global arrays sharded over the mesh."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
