"""After a stop signal, stop the local workers that can no longer finish.

When the launcher gets SIGTERM/SIGUSR1, torchrun forwards it to every worker and waits up to
``--shutdown-timeout`` (600 s here) for them to save. A save needs every rank. A worker can
end without saving: the signal reached it in its first milliseconds, before Python could
install a handler, or it failed. Its peers then block for good, for example in
``init_process_group`` waiting for a rank that will never join. torchrun does not look at
its workers while it waits, so the launcher would sit out the whole timeout.

:class:`StrandedWorkerGuard` watches for that case. Python's wakeup fd tells it that a signal
arrived. It then counts the workers that have ended against the exit codes they recorded
(0 or 3 in ``$MG_RANK_STATUS_DIR``). If more ended than recorded a clean exit, it kills the
rest after :data:`GRACE_S` seconds. They have nothing they could still save; the last
checkpoint is intact, since saves are atomic.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

import psutil

from megatron_grow.errors import EXIT_PREEMPTED
from megatron_grow.parallel.rank_status import worker_exit_codes

GRACE_S = 5.0
POLL_S = 0.2
CLEAN_EXIT_CODES = (0, EXIT_PREEMPTED)


def _is_running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_with_its_group(process: psutil.Process) -> None:
    """SIGKILL the worker and what it started (torchrun starts each worker in its own session)."""
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass


def _clean_exits(status_dir: str) -> int:
    return sum(code in CLEAN_EXIT_CODES for code in worker_exit_codes(status_dir).values())


class StrandedWorkerGuard:
    """Use as a context manager around torchrun, in the main thread (see the module doc)."""

    def __init__(self, status_dir: str, stop_signals: tuple[int, ...],
                 workers: Callable[[], list[psutil.Process]] | None = None, grace_s: float = GRACE_S):
        self.status_dir = status_dir
        self.stop_signals = set(stop_signals)
        self.workers = workers or (lambda: psutil.Process().children())
        self.grace_s = grace_s
        self.killed: list[int] = []
        self._receiver, self._sender = socket.socketpair()
        self._sender.setblocking(False)
        self._previous_fd = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._wait_for_stop_signal, daemon=True,
                                        name="mg-stranded-workers")

    def __enter__(self) -> StrandedWorkerGuard:
        try:
            self._previous_fd = signal.set_wakeup_fd(self._sender.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread: signals are not ours to watch
            return self
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._previous_fd is not None:
            signal.set_wakeup_fd(self._previous_fd)
        self._closed.set()
        self._sender.close()  # ends the thread's recv
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)
        self._receiver.close()

    def _wait_for_stop_signal(self) -> None:
        while True:
            try:
                data = self._receiver.recv(64)
            except OSError:
                return
            if not data:
                return
            if self.stop_signals & set(data):
                self._stop_stranded(self.workers())
                return

    def _stop_stranded(self, workers: list[psutil.Process]) -> None:
        deadline = None
        while not self._closed.is_set():
            running = [w for w in workers if _is_running(w)]
            if not running:
                return
            if deadline is None and len(workers) - len(running) > _clean_exits(self.status_dir):
                deadline = time.monotonic() + self.grace_s
            if deadline is not None and time.monotonic() >= deadline:
                print(f"[launch] a worker ended without saving after the stop signal; a save needs every "
                      f"rank, so the {len(running)} other worker(s) were stopped", file=sys.stderr, flush=True)
                for worker in running:
                    _kill_with_its_group(worker)
                    self.killed.append(worker.pid)
                return
            self._closed.wait(POLL_S)
