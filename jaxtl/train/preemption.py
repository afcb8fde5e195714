"""Preemption: clusters announce it with SIGTERM. The loop asks `reached(step)` after every step; when it says
yes, the run saves a checkpoint at that step and stops (`Preempted`), and rerunning the same command resumes.

With several processes they must all save at the same step: JAX's preemption service (started by
`jax.distributed.initialize`) catches SIGTERM on any process and agrees on the step. A single process catches
SIGTERM itself.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
    """The run stopped at a checkpoint because the cluster asked it to (SIGTERM); rerun to resume."""


class PreemptionWatch:
    """Says at which step boundary to save and stop after a SIGTERM; restores the previous handler on `close`."""

    def __init__(self):
        self.signalled = False
        self._previous = None
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread: leave SIGTERM to whoever owns it
                self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.signalled
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is off (jax_enable_preemption_service=False)
            return False

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
