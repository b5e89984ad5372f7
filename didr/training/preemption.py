"""Preemption signals: SIGTERM or SIGUSR1 asks a run to stop after its current step (it then raises Preempted)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Holds the name of the first preemption signal received, or None."""

    signal_name: str | None = None


@contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[StopRequest]:
    """Record SIGTERM / SIGUSR1 in the yielded StopRequest instead of dying; restore the previous handlers after.

    Handlers can only be set in the main thread; elsewhere (or with enabled=False) signals keep their handlers.
    """
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return

    def record(signum: int, frame: object) -> None:
        request.signal_name = request.signal_name or signal.Signals(signum).name

    previous = {s: signal.signal(s, record) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
