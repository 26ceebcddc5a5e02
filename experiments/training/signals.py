"""Stopping at a safe point: SIGINT and SIGTERM under :func:`stop_on_signals` (the CLI) do not
kill a run where it stands. Inside :func:`safe_points` (the training loop) a signal is noted and
the loop, at its next safe point (the end of an epoch), saves a checkpoint and raises
:class:`Interrupted`; outside them (loading data, compiling, writing results), or on a second
signal, :class:`Interrupted` is raised at once.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run (after saving a checkpoint at a safe point).

    Attributes:
        signum: the signal.
    """

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class _Stop:
    """The signal handlers' state: inside the training loop, and the signal received."""

    in_loop = False
    signum: int | None = None


def _handle(signum: int, frame: Any) -> None:
    del frame
    if _Stop.in_loop and _Stop.signum is None:
        _Stop.signum = signum  # stop at the next safe point
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop training at the next safe point (module doc)."""
    previous = {s: signal.signal(s, _handle) for s in (signal.SIGINT, signal.SIGTERM)}
    _Stop.signum = None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _Stop.signum = None


@contextlib.contextmanager
def safe_points() -> Iterator[None]:
    """Marks the training loop, where a signal waits for the next safe point."""
    outer = _Stop.in_loop
    _Stop.in_loop = True
    try:
        yield
    finally:
        _Stop.in_loop = outer
    if _Stop.signum is not None:  # arrived after the last safe point
        raise Interrupted(_Stop.signum)


def stop_requested() -> bool:
    """At a safe point: whether a signal asked to stop; a second one now interrupts at once."""
    if _Stop.signum is None:
        return False
    _Stop.in_loop = False
    return True


def stop_signal() -> int:
    """The signal that asked to stop (call once :func:`stop_requested` said one did)."""
    assert _Stop.signum is not None
    return _Stop.signum
