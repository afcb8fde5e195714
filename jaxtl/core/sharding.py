"""The data-parallel layout every jitted step uses: a 1-D `data` mesh over all devices of all processes, the
batch split over it, everything else replicated; batches put on the mesh ahead of the steps; and summing a step's
outputs over a split on the devices."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
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


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch_to_mesh(batches: Iterable[dict], mesh: Mesh, size: int = 2) -> Iterator[dict]:
    """`batches` (this process's slices) as global arrays on the mesh, put there by a background thread `size`
    batches ahead, so that the host-to-device copy of the next batch overlaps the current step and the thread that
    dispatches the steps does nothing else. Errors of the producer are raised here; closing the iterator (or
    leaving it) stops the thread and waits for it (a thread still copying into the runtime while the interpreter
    exits would abort the process)."""
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop, end = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(global_batch(batch, mesh)):
                    return
            put(end)
        except BaseException as e:  # raised in the consumer's thread
            put(_Failed(e))

    thread = threading.Thread(target=produce, name="jaxtl prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


@jax.jit
def add_trees(a, b):
    """`a + b` leaf by leaf, in one dispatch (running sums of a step's outputs, on the devices)."""
    return jax.tree_util.tree_map(jnp.add, a, b)


def sum_over_batches(step: Callable[[dict], dict], batches: Iterable[dict], mesh: Mesh) -> dict | None:
    """The sum of `step(global batch)` over `batches` (this process's slices), added up on the devices and fetched
    to the host once; None if empty."""
    totals = None
    for batch in prefetch_to_mesh(batches, mesh):
        sums = step(batch)
        totals = sums if totals is None else add_trees(totals, sums)
    return None if totals is None else jax.device_get(totals)
