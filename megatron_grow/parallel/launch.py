"""torchrun that keeps the workers' exit codes and passes preemption signals to them.

Plain ``torchrun`` loses what a ``megatron-grow`` worker says with its exit code: any worker
failure becomes torchrun's ``ChildFailedError`` report and exit 1 (so "bad input" = 2 and
"preempted, checkpoint saved, resubmit" = 3 are lost), and SIGUSR1 (SLURM's advance warning)
is not among the signals torchrun handles, so it kills torchrun with the workers orphaned.

:func:`launch` runs torchrun's own launcher (``torch.distributed.run``, same arguments) in this
process with four changes:

* SIGUSR1 is added to ``--signals-to-handle``: torchrun then forwards SIGTERM and SIGUSR1 to
  every worker's process group and waits for them (``--shutdown-timeout``, default here
  :data:`DEFAULT_SHUTDOWN_TIMEOUT` s instead of 30, so a checkpoint save can finish);
* every worker writes its exit code to ``$MG_RANK_STATUS_DIR/rank-<RANK>.rc`` (done by
  ``megatron_grow.__main__``; ``scripts/slurm/rank.sh`` writes the same files under SLURM);
* the launcher's exit code is :func:`combined_exit_code` of those: 3 if any local worker exited 3,
  else 2 if any exited 2, else torchrun's own outcome (0, 1, or 128 + signal), without
  torchrun's traceback;
* workers left waiting for a worker that ended without a clean exit (SIGKILLed, crashed, or
  killed by a stop signal before it could save) are stopped after a few seconds instead of at
  the end of the shutdown timeout (``stranded_workers``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser
from torch.distributed.run import run as torchrun

from megatron_grow.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED
from megatron_grow.parallel.preemption import pending_signal
from megatron_grow.parallel.rank_status import STATUS_DIR_ENV, worker_exit_codes
from megatron_grow.parallel.stranded_workers import StrandedWorkerGuard

DEFAULT_SHUTDOWN_TIMEOUT = 600
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")


def combined_exit_code(worker_codes: dict[str, int], launcher_code: int) -> int:
    """3 if any worker was preempted and saved, else 2 if any reported bad input, else torchrun's."""
    values = set(worker_codes.values())
    for code in (EXIT_PREEMPTED, EXIT_BAD_INPUT):
        if code in values:
            return code
    return launcher_code


def torchrun_arguments(argv: list[str]):
    """torchrun's parsed arguments with SIGUSR1 forwarded and a save-friendly shutdown timeout."""
    args = get_args_parser().parse_args(argv)
    handled = [s.strip() for s in (args.signals_to_handle or "").split(",") if s.strip()]
    args.signals_to_handle = ",".join(handled + [s for s in FORWARDED_SIGNALS if s not in handled])
    if args.shutdown_timeout is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = DEFAULT_SHUTDOWN_TIMEOUT
    return args


def _early_signal(signum, frame):
    """Before torchrun installs its handlers (no worker started yet): stop without a traceback."""
    raise SignalException(f"process {os.getpid()} got signal {signum}", sigval=signal.Signals(signum))


def launch(argv: list[str]) -> int:
    """Run torchrun with ``argv`` (its own syntax); returns the exit code to use (see module doc)."""
    for name in ("SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), _early_signal)
    if pending_signal() is not None:  # arrived while Python and torch were importing
        print(f"[launch] signal {pending_signal()} before any worker started: nothing to save", file=sys.stderr)
        return 128 + int(pending_signal())
    # Its per-process "failed (exitcode: N)" / "closing signal" lines: the summary below says it once.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    args = torchrun_arguments(argv)
    status_dir = tempfile.mkdtemp(prefix="mg-ranks-")
    os.environ[STATUS_DIR_ENV] = status_dir
    try:
        with StrandedWorkerGuard(status_dir):
            try:
                torchrun(args)
                launcher_code = 0
            except ChildFailedError:
                launcher_code = EXIT_FAILED
            except SignalException as e:
                launcher_code = 128 + int(e.sigval)
        codes = worker_exit_codes(status_dir)
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)
    code = combined_exit_code(codes, launcher_code)
    if code not in (0, EXIT_BAD_INPUT):  # bad input: the worker's one line already says it
        seen = ", ".join(f"rank {r}: {c}" for r, c in sorted(codes.items())) or "no worker reported"
        print(f"[launch] exit code {code} (workers: {seen})", file=sys.stderr, flush=True)
    return code
