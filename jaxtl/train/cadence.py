"""When to take a time-based checkpoint (`train.checkpoint_every_minutes`): by process 0's clock, the same step on
every process.

An orbax save needs every process of the job, so they must all decide to save at the same step; each process's own
clock would not do (clocks drift, processes start at different moments, and one process may run ahead of another
by a few dispatched steps). With one process, the clock decides at every step. With several, process 0 decides at
agreement points and broadcasts its decision (a tiny collective) together with the next agreement point, which it
places about `AGREE_SECONDS` (or a quarter of the interval, if shorter) of its own time later (at least one step):
the others follow, whatever their clocks say.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from jax.experimental import multihost_utils

AGREE_SECONDS = 10.0
FIRST_AGREEMENT = 10  # steps after a (re)start: the first steps compile


class TimedSaves:
    """`due(step)` once `minutes` have passed since the last save (`saved()`), by process 0's clock."""

    def __init__(self, minutes: float, step: int, clock=time.monotonic):
        self.interval, self.clock = 60.0 * minutes, clock
        self.last = self.mark = clock()
        self.mark_step, self.next_agreement = step, step + FIRST_AGREEMENT

    def saved(self) -> None:
        self.last = self.clock()

    def due(self, step: int) -> bool:
        if not self.interval:
            return False
        if jax.process_count() == 1:
            return self.clock() - self.last >= self.interval
        if step < self.next_agreement:
            return False
        now = self.clock()  # only process 0's reading counts: the broadcast sends its values
        per_step = (now - self.mark) / max(step - self.mark_step, 1)
        agree = min(AGREE_SECONDS, self.interval / 4)
        ahead = int(np.clip(round(agree / max(per_step, 1e-6)), 1, 10_000))
        due, ahead = multihost_utils.broadcast_one_to_all(
            np.array([now - self.last >= self.interval, ahead], np.int64))
        self.mark, self.mark_step, self.next_agreement = now, step, step + int(ahead)
        return bool(due)
