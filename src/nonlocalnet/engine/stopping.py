"""Stopping a run cleanly on SIGTERM / SIGINT (Ctrl-C).

Cluster schedulers send SIGTERM some time before they kill a job; a user presses Ctrl-C. Either
way the training loop finishes the step it is in, writes a checkpoint atomically and raises
:class:`TrainingStopped`; the command line prints one line saying how to continue and exits with
the conventional code (128 + the signal's number: 130 for SIGINT, 143 for SIGTERM). A second
signal while stopping exits at once, except a repeat of the first signal within
:data:`REPEAT_WINDOW_S` seconds of it, which is the same request arriving twice: under torchrun
a Ctrl-C in the terminal reaches each worker from the terminal and again from torchrun's agent,
which forwards it. DataLoader workers ignore both signals (the main process shuts them down), so
a Ctrl-C delivered to the whole process group does not kill them mid-batch.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

__all__ = [
    "REPEAT_WINDOW_S",
    "STOP_SIGNALS",
    "StopRequest",
    "TrainingStopped",
    "ignore_stop_signals",
]

logger = logging.getLogger(__name__)

#: the signals that stop a run cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: a repeat of the first signal within this many seconds is the same request, not a second one.
REPEAT_WINDOW_S = 2.0


class TrainingStopped(Exception):  # noqa: N818 (a stop, like StopIteration)
    """A run stopped on a signal after writing a checkpoint.

    Attributes:
        step: the step the run stopped at (its checkpoint's step).
        signum: the signal received.
        checkpoint: the checkpoint written, or None (not the main process).
        exit_code: 128 + signum, as a shell reports a process ended by that signal.
    """

    def __init__(self, step: int, signum: int, checkpoint: Any = None) -> None:
        self.step = step
        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped at step {step} on {name}; checkpoint: {checkpoint}")


class StopRequest:
    """Catch SIGINT/SIGTERM inside a ``with`` block; the loop polls :attr:`signum`.

    Only the main thread can install signal handlers; elsewhere the block changes nothing.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:
            if signum == self.signum and time.monotonic() - self._first_at < REPEAT_WINDOW_S:
                logger.debug(
                    "%s again within %g s: the same request",
                    signal.Signals(signum).name,
                    REPEAT_WINDOW_S,
                )
                return
            print(f"\n{signal.Signals(signum).name} again: exiting now", file=sys.stderr)
            os._exit(128 + signum)
        self.signum = signum
        self._first_at = time.monotonic()
        logger.warning(
            "%s received: stopping after this step with a checkpoint (send it again %g s or "
            "more later to exit now)",
            signal.Signals(signum).name,
            REPEAT_WINDOW_S,
        )


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the worker leaves SIGINT/SIGTERM to the main process."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
