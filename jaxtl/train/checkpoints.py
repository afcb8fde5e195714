"""orbax checkpoints in the workdir: `checkpoints/` (latest) and `best/` (best val accuracy).

orbax writes each step into a temporary directory and renames it when complete, and lists only finished
steps, so a run killed mid-save leaves nothing that is read back; resuming takes the newest finished step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, workdir: str | Path):
        options = lambda: ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)  # noqa: E731
        workdir = Path(workdir).absolute()
        self.latest = ocp.CheckpointManager(workdir / "checkpoints", options=options(), item_names=("state", "meta"))
        self.best = ocp.CheckpointManager(workdir / "best", options=options(), item_names=("state", "meta"))

    def save(self, manager: ocp.CheckpointManager, epoch: int, state: Any, meta: dict) -> None:
        if epoch in manager.all_steps():  # a resumed run redoing the epoch a kill interrupted
            manager.delete(epoch)
        manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()

    def latest_epoch(self, manager: ocp.CheckpointManager | None = None) -> int | None:
        return (manager or self.latest).latest_step()

    def restore_meta(self, manager: ocp.CheckpointManager) -> dict:
        step = manager.latest_step()
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_state(self, manager: ocp.CheckpointManager, abstract_state: Any = None) -> Any:
        """The newest finished state; into `abstract_state`'s structure, or as plain nested dicts without one."""
        step = manager.latest_step()
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]

    def close(self) -> None:
        self.latest.close()
        self.best.close()
