"""Remember SIGTERM/SIGUSR1 from the first moment of a training process.

Python's default for SIGTERM kills the process (exit -15) and SIGUSR1's kills it too, so a
preemption notice that arrives while a run is still importing, building its model or
loading a checkpoint would end it with nothing saved and no clean exit code. ``megatron-grow
train`` calls :func:`defer_stop_signals` before anything else; the trainer's signal flag
starts from :func:`pending_signal`, so such a signal makes the run save after its first step
and exit 3, like one that arrives later.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_pending: int | None = None
_previous: dict = {}


def _remember(signum, frame) -> None:
    global _pending
    _pending = signum


def defer_stop_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            _previous.setdefault(sig, signal.signal(sig, _remember))


def restore_stop_signals() -> None:
    """Undo :func:`defer_stop_signals` when the command is over (it may run inside another program,
    e.g. a test; a handler left behind would make forked workers ignore SIGTERM)."""
    global _pending
    if threading.current_thread() is threading.main_thread():
        for sig, handler in _previous.items():
            signal.signal(sig, handler)
    _previous.clear()
    _pending = None


def pending_signal() -> int | None:
    return _pending
