"""Stop signals: SIGTERM, SIGUSR1 (a scheduler's preemption or time limit) and SIGINT (Ctrl-C, Snakemake's stop).

Inside training, `stop_on_signals` records the signal so that the run finishes its step, checkpoints and raises
Preempted. Anywhere else in a `didr` command, `raise_on_signals` turns the signal into Interrupted, which the
command line maps to exit 75 (EX_TEMPFAIL) like Preempted. `deferred_signals` holds them back over the few
statements that must not be split (swapping an output folder into place).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a CLI exits with it when stopped by a signal, so a scheduler requeues the run


class StopRequest:
    """Holds the name of the first preemption signal received, or None."""

    signal_name: str | None = None


class Interrupted(BaseException):
    """A stop signal arrived outside training (a BaseException, as KeyboardInterrupt: no `except Exception` eats it)."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _handling(handler: signal.Handlers | object) -> Iterator[None]:
    previous = {s: signal.signal(s, handler) for s in SIGNALS}  # type: ignore[arg-type]
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, signal.SIG_DFL if old is None else old)


@contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[StopRequest]:
    """Record SIGTERM / SIGUSR1 / SIGINT in the yielded StopRequest instead of dying; restore the previous handlers
    after. Handlers can only be set in the main thread; elsewhere (or with enabled=False) signals keep their handlers.
    """
    request = StopRequest()
    if not enabled or not _in_main_thread():
        yield request
        return

    def record(signum: int, frame: object) -> None:
        request.signal_name = request.signal_name or signal.Signals(signum).name

    with _handling(record):
        yield request


_ARRIVED: list[str] = []  # the stop signals raise_on_signals' handler received in its block


@contextmanager
def raise_on_signals() -> Iterator[None]:
    """Raise Interrupted on SIGTERM / SIGUSR1 / SIGINT in the block (main thread only); restore the handlers after."""
    if not _in_main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        _ARRIVED.append(signal.Signals(signum).name)
        raise Interrupted(_ARRIVED[0])

    _ARRIVED.clear()
    with _handling(interrupt):
        yield


def raise_if_interrupted() -> None:
    """Raise Interrupted if a stop signal arrived in raise_on_signals' block. Call it before turning an error into a
    message: a C extension running when the handler raised (safetensors, torch) replaces Interrupted by an error of
    its own (ValueError: could not determine the shape of object type 'torch.storage.UntypedStorage')."""
    if _ARRIVED:
        raise Interrupted(_ARRIVED[0])


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Block the stop signals in the block; one that arrived meanwhile is delivered when it ends (main thread)."""
    if not _in_main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
