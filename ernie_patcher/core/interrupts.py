"""SIGINT and SIGTERM as errors, so a write phase is rolled back in the process before it exits."""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import ExitCode, PatcherError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(PatcherError):
    """The run got SIGINT (exit 130) or SIGTERM (exit 143)."""

    def __init__(self, signum: int) -> None:
        code = ExitCode.INTERRUPTED if signum == signal.SIGINT else ExitCode.TERMINATED
        super().__init__(code, f"interrupted by {signal.Signals(signum).name}",
                         hint="run the command again when it may finish")


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextmanager
def signals_as_errors() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise Interrupted (a PatcherError); the previous handlers
    come back afterwards. Outside the main thread signals cannot be handled: nothing changes."""
    previous = {number: signal.getsignal(number) for number in SIGNALS}
    try:
        for number in SIGNALS:
            signal.signal(number, _raise)
    except ValueError:  # not the main thread (signal.signal refuses before changing anything)
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
