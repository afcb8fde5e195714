"""Stopping cleanly: clusters announce preemption with SIGTERM, a person presses Ctrl-C (SIGINT). The loop asks
`reached(step)` after every step; when it says yes, the run saves a checkpoint at that step and stops
(`Preempted`), and rerunning the same command resumes. A second Ctrl-C stops at once (`KeyboardInterrupt`), with the
checkpoints already on disk kept.

With several processes they must all save at the same step: JAX's preemption service (started by
`jax.distributed.initialize`) catches SIGTERM on any process and agrees on the step; a Ctrl-C is handed to it as a
SIGTERM. A single process catches both signals itself.
"""

from __future__ import annotations

import logging
import os
import signal

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Preempted(Exception):
    """The run stopped at a checkpoint because the cluster (SIGTERM) or the user (SIGINT) asked it to; rerun the
    same command to resume. `signum` says which."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum


class Paused(Exception):
    """The run stopped after the epochs its plan allows (`Plan.pause_after_epochs`), saved: training the same plan
    again with a later pause (or none) continues it exactly as if it had never stopped. `epochs`: those trained."""

    def __init__(self, epochs: int):
        super().__init__(f"paused after epoch {epochs}")
        self.epochs = epochs


class PreemptionWatch:
    """Says at which step boundary to save and stop after a SIGTERM or a first SIGINT; restores the previous
    handlers on `close`."""

    def __init__(self):
        self.signalled: int | None = None
        self.abort = False  # a second Ctrl-C
        self._previous: dict[int, object] = {}
        single = jax.process_count() == 1
        handlers = {signal.SIGINT: self._on_sigint} | ({signal.SIGTERM: self._on_signal} if single else {})
        for signum, handler in handlers.items():
            try:
                self._previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: leave the signal to whoever owns it
                pass

    def _on_signal(self, signum, frame) -> None:
        self.signalled = signum

    def _on_sigint(self, signum, frame) -> None:
        if self.signalled is not None:  # the second Ctrl-C: stop now (or, if Python swallows this exception where it
            self.abort = True  # lands, say in a garbage-collection callback, at the next step: `reached`)
            raise KeyboardInterrupt
        log.warning("Ctrl-C: saving a checkpoint at the next step, then stopping (press Ctrl-C again to stop at once)")
        self.signalled = signal.SIGINT
        if jax.process_count() > 1:  # the preemption service agrees on the step for every process
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        if self.abort:
            raise KeyboardInterrupt
        if jax.process_count() == 1:
            return self.signalled is not None
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is off (jax_enable_preemption_service=False)
            return self.signalled is not None

    @property
    def signum(self) -> int:
        return self.signalled or signal.SIGTERM

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
