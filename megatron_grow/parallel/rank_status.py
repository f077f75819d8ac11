"""Each worker's exit code, left in a folder where ``megatron-grow launch`` reads it.

torchrun keeps only "a worker failed" of its workers' exit codes, so every worker also writes its
code to ``$MG_RANK_STATUS_DIR/rank-<RANK>.rc`` (one integer and a newline; ``scripts/slurm/rank.sh``
writes the same files under SLURM). The launcher (``parallel.launch``) and its stranded-worker
guard (``parallel.stranded_workers``) read them back with :func:`worker_exit_codes`.
"""

from __future__ import annotations

import os

STATUS_DIR_ENV = "MG_RANK_STATUS_DIR"


def record_exit_code(code: int) -> None:
    """Worker side: leave this rank's exit code where the launcher looks (no-op outside it).

    Args:
        code: the exit code this process is about to exit with.
    """
    status_dir = os.environ.get(STATUS_DIR_ENV)
    if not status_dir or not os.path.isdir(status_dir):
        return
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    try:
        with open(os.path.join(status_dir, f"rank-{rank}.rc"), "w", encoding="utf-8") as f:
            f.write(f"{code}\n")
    except OSError:
        pass  # the exit code itself still reaches torchrun


def worker_exit_codes(status_dir: str) -> dict[str, int]:
    """The exit codes recorded so far in ``status_dir``.

    Args:
        status_dir: the folder named by ``$MG_RANK_STATUS_DIR``.

    Returns:
        ``{rank: exit code}`` for every readable ``rank-<RANK>.rc`` file (unreadable ones are skipped).
    """
    codes = {}
    for name in sorted(os.listdir(status_dir)):
        if name.startswith("rank-") and name.endswith(".rc"):
            try:
                with open(os.path.join(status_dir, name), encoding="utf-8") as f:
                    codes[name[5:-3]] = int(f.read().strip())
            except (OSError, ValueError):
                continue
    return codes
