"""Clean ends on SIGINT / SIGTERM: the run stops where it is, never inside a checkpoint save.

While `stop_on_signals()` is active, the first SIGINT or SIGTERM raises `Interrupted` in the main
thread, which abandons the current step (nothing of it is saved; the run resumes from the last
checkpoint and redoes it, bit for bit). Inside `checkpoint_guard()` the signal is held back until
the block ends, so a checkpoint being written is completed before the run stops. A second signal
while the run is already stopping exits at once.

`Interrupted` derives from BaseException, like KeyboardInterrupt, so `except Exception` handlers on
the way up do not swallow it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was asked to stop by `signum`; the shell's exit status for it is 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    deferring = 0  # nesting depth of checkpoint_guard()
    pending: int | None = None  # a signal held back by checkpoint_guard()
    raised = False  # Interrupted was raised: the run is stopping


def _handler(signum: int, frame: FrameType | None) -> None:
    if _State.raised or _State.pending is not None:
        _say(f"{signal.Signals(signum).name} again while stopping: exiting now")
        os._exit(128 + signum)
    if _State.deferring:
        _State.pending = signum
        _say(f"{signal.Signals(signum).name}: stopping once the checkpoint being written is complete")
        return
    _State.raised = True
    raise Interrupted(signum)


def _say(message: str) -> None:
    # os.write, not print: the handler may run while the main thread is inside a write to stderr,
    # and a buffered stream refuses a reentrant write.
    os.write(sys.stderr.fileno(), f"\n{message}\n".encode())


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` inside this block; the previous handlers come back after."""
    previous = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    _State.deferring, _State.pending, _State.raised = 0, None, False
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, _handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def checkpoint_guard() -> Iterator[None]:
    """Hold a signal back until this block (a checkpoint save) is done, then stop."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
    if _State.deferring == 0 and _State.pending is not None:
        signum, _State.pending = _State.pending, None
        _State.raised = True
        raise Interrupted(signum)
