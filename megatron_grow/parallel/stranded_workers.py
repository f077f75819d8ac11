"""Stop the local workers that can no longer finish because a peer is gone.

Every rank is needed to go on: a step's collectives, and a save. A worker can end without a
clean exit: SIGKILLed (the OOM killer, a user), crashed, or killed by a stop signal that reached
it in its first milliseconds, before Python could install a handler. Its peers then block for
good in a collective (or in ``init_process_group``, waiting for a rank that will never join).
torchrun notices the failure only to SIGTERM the peers and wait up to ``--shutdown-timeout``
(600 s here, so that a save can finish); a peer that takes SIGTERM as "save, then exit 3" cannot
save without the dead rank, so the launcher would sit out the whole timeout.

:class:`StrandedWorkerGuard` watches the workers from the start. It counts the workers that have
ended against the exit codes they recorded (0 or 3 in ``$MG_RANK_STATUS_DIR``); if more ended
than recorded a clean exit, it kills the rest after :data:`GRACE_S` seconds. They have nothing
they could still do or save; the last checkpoint is intact, since saves are atomic.
"""

from __future__ import annotations

import os
import signal
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
    """Use as a context manager around torchrun (see the module doc)."""

    def __init__(self, status_dir: str, workers: Callable[[], list[psutil.Process]] | None = None,
                 grace_s: float = GRACE_S):
        self.status_dir = status_dir
        self.workers = workers or (lambda: psutil.Process().children())
        self.grace_s = grace_s
        self.killed: list[int] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="mg-stranded-workers")

    def __enter__(self) -> StrandedWorkerGuard:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)

    def _watch(self) -> None:
        seen: dict[int, psutil.Process] = {}  # every worker ever started (an ended one is reaped by torchrun)
        deadline = None
        while not self._closed.is_set():
            for worker in self.workers():
                seen.setdefault(worker.pid, worker)
            running = [w for w in seen.values() if _is_running(w)]
            if seen and not running:
                return
            if deadline is None and len(seen) - len(running) > _clean_exits(self.status_dir):
                deadline = time.monotonic() + self.grace_s
            if deadline is not None and time.monotonic() >= deadline:
                print(f"[launch] a worker ended without saving (killed, or failed); every rank is needed, so the "
                      f"{len(running)} other worker(s) were stopped", file=sys.stderr, flush=True)
                for worker in running:
                    _kill_with_its_group(worker)
                    self.killed.append(worker.pid)
                return
            self._closed.wait(POLL_S)
