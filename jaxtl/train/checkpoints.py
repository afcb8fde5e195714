"""orbax checkpoints in the workdir: `checkpoints/` (the latest two) and `best/` (the best val accuracy), by global
step, each a TrainState and a JSON meta (where in the run it was taken, the metrics so far, the class names, and
a CRC-32 of every array of the state).

Saving is asynchronous: `save` returns once the arrays are copied off the devices, and the files are written
while training goes on; `check` (called after every step) raises as soon as a background write has failed. orbax
writes each step into a temporary directory and renames it when complete, and lists only finished steps, so a run
killed mid-save leaves nothing that is read back (its temporaries are removed when the run restarts). Every
process takes part in every save, as orbax requires. A checkpoint restores onto any device layout: the state is
replicated, and `restore` places it as the abstract state given says.

What is restored is checked against the CRCs saved with it: a checkpoint whose files were damaged (truncated,
zeroed, flipped bytes) is never used; the newest good one is, with a warning naming the one skipped and why, and
when none is left the error says what to do. A failed write (a full disk, no permission) is one `WriteError`
naming the directory.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxtl.core import locations
from jaxtl.core.atomic import plain_json, write_error, write_failure, writes_into
from jaxtl.core.errors import DivergedError, RunFileError, WriteError
from jaxtl.core.processes import is_main
from jaxtl.rules import path_of
from jaxtl.train.workdir import CHECKPOINT_FOLDERS, orbax_directory, straight_url

log = logging.getLogger(__name__)


def _on_host(state: Any) -> Any:
    """The state's values on this host, in one transfer (a replicated global array of a multi-process job: this
    process's copy)."""
    def local(leaf):
        return leaf.addressable_data(0) if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable else leaf

    return jax.device_get(jax.tree_util.tree_map(local, state))


class NonFiniteState(DivergedError):
    """A state with NaN or Inf values, refused by `Checkpoints.save` (no checkpoint is ever of a diverged state)."""


def state_checksums(state: Any, finite: bool = False) -> dict[str, int]:
    """`{path: CRC-32}` of every array of a state (its bytes on this host); with `finite`, a `NonFiniteState` naming
    the first array holding a NaN or an Inf."""
    checksums = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(_on_host(state)):
        values = np.ascontiguousarray(leaf)
        if finite and np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            raise NonFiniteState(f"{path_of(path)} holds NaN or Inf values")
        checksums[path_of(path)] = zlib.crc32(memoryview(values).cast("B"))  # no copy of the bytes
    return checksums


def damage(state: Any, checksums: dict[str, int] | None) -> str | None:
    """Why a restored state is not the one saved (the first array whose CRC differs), or None."""
    if checksums is None:  # a checkpoint saved before checksums were: nothing to check against
        return None
    found = state_checksums(state)
    if set(found) != set(checksums):
        return f"its arrays are not those saved ({len(found)} against {len(checksums)})"
    for path, crc in checksums.items():
        if found[path] != crc:
            return f"array {path} differs from what was saved (CRC-32 mismatch)"
    return None


def _async_options() -> ocp.options.AsyncOptions | None:
    """Writes in the background, but a step's temporary directories are made before `save` returns (orbax makes
    them in a background thread by default): after a failed save (a full disk) and its clean-up, no thread is
    left to make them again."""
    fields = getattr(ocp.options.AsyncOptions, "__dataclass_fields__", {})
    if "create_directories_asynchronously" in fields:
        return ocp.options.AsyncOptions(create_directories_asynchronously=False)
    return None  # an orbax that makes them before `save` returns


def _handlers() -> dict:
    """A checkpoint's items: the state (arrays) and its meta (JSON)."""
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _on_this_host(metadata: Any) -> Any:
    """A restore target of plain NumPy arrays for a saved state's metadata: the state whole on this host, whatever
    devices and processes saved it (without one, orbax places it as it was saved, which only that layout can)."""
    return jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype) if hasattr(x, "shape") else x, metadata)


class Checkpoints:
    """The latest and best checkpoints of a workdir; `read_only` to restore from a run without writing to it."""

    def __init__(self, workdir: str | Path, read_only: bool = False):
        def options(name: str, keep: int):
            # Each manager its own barrier names: both save the same step numbers, and with several processes the
            # async commit waits at a barrier named after the step.
            return ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=not read_only, read_only=read_only, enable_async_checkpointing=True,
                cleanup_tmp_directories=not read_only, async_options=_async_options(),
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))

        self.workdir = Path(workdir).absolute()
        self.root = checkpoint_root(self.workdir)  # the workdir, or (several processes) its folder in the bucket
        self._pending: list[tuple[ocp.CheckpointManager, int]] = []  # saves not yet seen finished on disk
        with writes_into(self.root):
            # The latest two: if the newest turns out damaged, the one before it is still there.
            self.latest = ocp.CheckpointManager(self.root / "checkpoints", options=options("latest", 2),
                                                item_handlers=_handlers())
            self.best = ocp.CheckpointManager(self.root / "best", options=options("best", 1),
                                              item_handlers=_handlers())

    def save(self, manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, wait: bool = False) -> None:
        """Saves `state` and `meta` (with the state's CRCs) as `step` (replacing a step of that number left by an
        interrupted run); a state with NaN or Inf values is refused (`NonFiniteState`), so a checkpoint is always
        of a finite state."""
        meta = plain_json(meta | {"checksums": state_checksums(state, finite=True)})
        with writes_into(manager.directory):
            manager.wait_until_finished()  # the previous save had a whole interval to finish
            self.check()  # ... and if it failed, we stop here
            if step in manager.all_steps():
                manager.delete(step)
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=True)
            self._pending.append((manager, step))
            if wait:
                manager.wait_until_finished()
                self.check()

    def check(self) -> None:
        """Raises `WriteError` once a background save is seen to have failed (a full disk: the run stops now, not
        an epoch later). orbax renames a step's directory into place only when it is complete, so a save that is
        no longer in progress and left no such directory failed; its error says why."""
        for manager, step in list(self._pending):
            if manager.is_saving_in_progress():
                continue
            self._pending.remove((manager, step))
            if not (manager.directory / str(step)).is_dir():
                raise self._failed(manager, step)

    def _failed(self, manager: ocp.CheckpointManager, step: int) -> Exception:
        directory = manager.directory
        try:
            manager.wait_until_finished()
            manager.check_for_errors()
        except Exception as e:  # the background write's own error
            return write_error(directory, e) if write_failure(e) is not None else e
        if "://" in str(directory):
            return WriteError(f"cannot write to {directory}: the checkpoint of step {step} was not written; check "
                              "your access to the bucket and run the same command again")
        free = shutil.disk_usage(directory).free
        return WriteError(f"cannot write to {directory}: the checkpoint of step {step} was not written "
                          f"({free / 2**20:.1f} MB free there); free space and run the same command again")

    def latest_step(self, manager: ocp.CheckpointManager | None = None) -> int | None:
        return (manager or self.latest).latest_step()

    def restore(self, manager: ocp.CheckpointManager, abstract_state: Any = None) -> tuple[Any, dict]:
        """`(state, meta)` of the newest checkpoint of `manager` that restores and matches its CRCs; the state into
        the structure and shardings of `abstract_state` (or of what it returns for the checkpoint's meta, when it is
        a function), or as plain nested dicts without one. Damaged ones are skipped with a warning; with none left,
        a `RunFileError` naming them."""
        skipped = []
        for step in sorted(manager.all_steps(), reverse=True):
            where = manager.directory / str(step)
            try:
                meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                target = abstract_state(meta) if callable(abstract_state) else abstract_state
                if target is None:  # as saved, on this host (a job of other devices or processes saved it)
                    target = _on_this_host(manager.item_metadata(step)["state"])
                state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
                reason = damage(state, meta.get("checksums"))
            except Exception as e:  # damaged files fail in TensorStore, orbax or JSON, each its own way
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'unreadable'}"
            if reason is None:
                if skipped:
                    log.warning("checkpoint %s is used instead of the damaged %s", where, "; ".join(skipped))
                return state, meta
            skipped.append(f"{where} ({reason})")
            log.warning("checkpoint %s cannot be used: %s", where, reason)
        if not skipped:
            raise RunFileError(f"no checkpoint in {manager.directory}; run `train` with this workdir first")
        raise RunFileError(f"no usable checkpoint in {manager.directory}: {'; '.join(skipped)}. Restore it from a "
                           "copy, or delete the folder to start the run again")

    def restore_kept(self, abstract_state: Any = None, latest: tuple[Any, Callable] | None = None
                     ) -> tuple[Any, dict]:
        """The kept model: the best checkpoint, or (damaged) the latest, with a warning saying so. The best holds
        the model alone (`jaxtl.train.steps.keep_form`), the latest the whole state: `latest` is `(its abstract
        state, the function making the kept form of it)`; without it, both restore as `abstract_state` says."""
        try:
            return self.restore(self.best, abstract_state)
        except RunFileError as e:
            if self.latest_step() is None:
                raise
            log.warning("%s; using the latest checkpoint instead of the best", e)
            if latest is None:
                return self.restore(self.latest, abstract_state)
            state, meta = self.restore(self.latest, latest[0])
            return latest[1](state), meta

    def wait(self) -> None:
        for manager in (self.latest, self.best):
            with writes_into(manager.directory):
                manager.wait_until_finished()
        self.check()

    def close(self) -> None:
        for manager in (self.latest, self.best):
            with writes_into(manager.directory):
                manager.close()

    def abandon(self) -> None:
        """After a failure: lets writes in flight end (their errors are the failure being reported, or follow from
        it), closes the managers, and removes orbax's temporary directories, so that only finished checkpoints
        remain."""
        for manager in (self.latest, self.best):
            with contextlib.suppress(Exception):
                manager.wait_until_finished()
            with contextlib.suppress(Exception):
                manager.close()
        if is_main():
            _remove_temporaries([manager.directory for manager in (self.latest, self.best)])


def _remove_temporaries(directories: list, patience: float = 10.0) -> None:
    """Removes orbax's temporary directories in `directories` (local or bucket paths, as orbax's `epath`). After a
    failed save, `wait_until_finished` returns with the first error while the save's other writers may still be
    ending (one of them made a file in a temporary directory being removed, which then stayed): so until none is
    left, for up to `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        left = [tmp for directory in directories for tmp in epath.Path(directory).glob("*.orbax-checkpoint-tmp*")]
        for tmp in left:
            with contextlib.suppress(OSError):
                tmp.rmtree(missing_ok=True)
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def checkpoint_root(workdir: Path):
    """The folder holding the checkpoint folders of the run in `workdir`: `workdir` itself, or for a bucket
    workdir's mirror in a job of several processes, the same folder in the bucket (`straight_url`), as orbax's
    path."""
    url = straight_url(workdir)
    return Path(workdir) if url is None else orbax_directory(url)


def move_checkpoints(source: Path, target: Path) -> None:
    """Moves the checkpoint folders of the run in `source` to the run in `target`, where it has none (in the
    bucket, for a job of several processes: `straight_url`); process 0 calls it."""
    source_url, target_url = straight_url(source), straight_url(target)
    for name in CHECKPOINT_FOLDERS:
        if source_url is None:
            if (source / name).exists() and not (target / name).exists():
                shutil.move(str(source / name), str(target / name))
        elif locations.is_dir(locations.join(source_url, name)) and not locations.is_dir(
                locations.join(target_url, name)):
            locations.move(locations.join(source_url, name), locations.join(target_url, name))


def remove_run(directory: Path) -> None:
    """Removes the folder of a run (an `auto` trial's), and for a bucket workdir of several processes the same
    folder in the bucket, where orbax wrote its checkpoints (`straight_url`)."""
    url = straight_url(directory)
    if url is not None:
        locations.remove_tree(url)
    shutil.rmtree(directory, ignore_errors=True)
