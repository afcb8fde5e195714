"""orbax checkpoints in the workdir: `checkpoints/` (the latest) and `best/` (the best val accuracy), by global
step, each a TrainState and a JSON meta (where in the run it was taken, the metrics so far, the class names).

Saving is asynchronous: `save` returns once the arrays are copied off the devices, and the files are written
while training goes on. orbax writes each step into a temporary directory and renames it when complete, and
lists only finished steps, so a run killed mid-save leaves nothing that is read back; resuming takes the newest
finished step. Every process takes part in every save, as orbax requires. A checkpoint restores onto any device
layout: the state is replicated, and `restore_state` places it as the abstract state given says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, workdir: str | Path):
        def options(name: str):
            # Each manager its own barrier names: both save the same step numbers, and with several processes the
            # async commit waits at a barrier named after the step.
            return ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, enable_async_checkpointing=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))

        workdir = Path(workdir).absolute()
        self.latest = ocp.CheckpointManager(workdir / "checkpoints", options=options("latest"),
                                            item_names=("state", "meta"))
        self.best = ocp.CheckpointManager(workdir / "best", options=options("best"), item_names=("state", "meta"))

    def save(self, manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, wait: bool = False) -> None:
        """Saves `state` and `meta` as `step` (replacing a step of that number left by an interrupted run)."""
        if step in manager.all_steps():
            manager.wait_until_finished()
            manager.delete(step)
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                     force=True)
        if wait:
            manager.wait_until_finished()

    def latest_step(self, manager: ocp.CheckpointManager | None = None) -> int | None:
        return (manager or self.latest).latest_step()

    def restore_meta(self, manager: ocp.CheckpointManager) -> dict:
        step = manager.latest_step()
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_state(self, manager: ocp.CheckpointManager, abstract_state: Any = None) -> Any:
        """The newest finished state; into `abstract_state`'s structure and shardings, or as plain nested dicts
        without one."""
        step = manager.latest_step()
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()
