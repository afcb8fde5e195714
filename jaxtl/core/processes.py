"""The processes of a job: joining it, which process writes, waiting for all, voting, and each process's slice of
a global batch.

Joining a multi-process job: every process of a TPU pod slice, a SLURM or Open MPI job, or a hand-started group
runs the same command; `initialize` connects them before any other JAX call, so that `jax.devices()` lists every
device of every process and one `jit` spans them.

- Explicitly: `--coordinator HOST:PORT --num-processes N --process-id I` (or `JAXTL_COORDINATOR`,
  `JAXTL_NUM_PROCESSES`, `JAXTL_PROCESS_ID`); process 0 runs the coordinator at HOST:PORT.
- Detected: on Cloud TPU (more than one worker), SLURM (more than one task) and Open MPI (more than one rank),
  `jax.distributed.initialize()` reads the job's own environment.
- Otherwise a single process: nothing to do.

A process that dies stops the others: the coordinator misses its heartbeats for `JAXTL_HEARTBEAT_TIMEOUT`
seconds (default 100, JAX's) and every other process exits with "the JAX distributed service detected fatal
errors", instead of waiting in a collective forever.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import jax
import numpy as np

from jaxtl.core.errors import ConfigError

log = logging.getLogger(__name__)


def detected_cluster() -> str | None:
    """The multi-process environment JAX can read by itself, if this process runs in one."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "Cloud TPU"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the job this process belongs to (see module docstring); a single process returns at once."""
    env = os.environ
    coordinator = coordinator or env.get("JAXTL_COORDINATOR") or None
    num_processes = num_processes if num_processes is not None else _int_env("JAXTL_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("JAXTL_PROCESS_ID")
    heartbeat = _int_env("JAXTL_HEARTBEAT_TIMEOUT") or 100
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(value is not None for value in given.values()):
        missing = [flag for flag, value in given.items() if value is None]
        if missing:
            raise ConfigError("a multi-process job needs --coordinator, --num-processes and --process-id (or "
                              "JAXTL_COORDINATOR, JAXTL_NUM_PROCESSES, JAXTL_PROCESS_ID); missing "
                              + ", ".join(missing))
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} must be in 0..{num_processes - 1} (--num-processes "
                              f"{num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat)
    elif cluster := detected_cluster():
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
        log.info("joined the %s job", cluster)
    else:
        return
    log.info("process %d of %d: %d local device(s), %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: must be an integer") from None


def is_main() -> bool:
    """Process 0 writes reports and shows progress; every process computes."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process of the job waits here until all have arrived (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxtl {name}")


def any_process(flags: list[bool]) -> list[bool]:
    """Each flag, true if it is true on any process of the job (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return list(flags)
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32)))
    return gathered.reshape(-1, len(flags)).any(axis=0).tolist()


def from_main(data: bytes | None) -> bytes | None:
    """Process 0's `data` on every process (a collective: every process calls it; the others' `data` is unused)."""
    if jax.process_count() == 1:
        return data
    from jax.experimental import multihost_utils

    size = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if data is None else len(data))))
    if size <= 0:
        return None if size < 0 else b""
    mine = np.frombuffer(data, np.uint8) if is_main() else np.zeros(size, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(mine)).tobytes()


@dataclass(frozen=True)
class ProcessSlice:
    """This process's share of the data: process `index` of `count` takes the `index`-th contiguous slice of every
    global batch (every process the same size), so the slices put together are the global batch in order."""

    index: int = 0
    count: int = 1

    @classmethod
    def current(cls) -> "ProcessSlice":
        return cls(jax.process_index(), jax.process_count())

    def local(self, global_batch: int) -> int:
        """Examples per global batch on this process; the global batch must divide evenly."""
        if global_batch % self.count:
            raise ConfigError(f"batch size {global_batch} is not divisible by the {self.count} processes of the job")
        return global_batch // self.count

    def of(self, indices: np.ndarray, global_batch: int) -> np.ndarray:
        """This process's part of one global batch's example indices (of a short last batch, what is left of it)."""
        local = self.local(global_batch)
        return indices[self.index * local : (self.index + 1) * local]
