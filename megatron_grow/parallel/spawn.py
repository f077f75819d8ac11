"""Run a function in N local processes with torch.distributed set up (gloo on CPU).

Used by the multi-process tests and benchmarks: each process gets RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_ADDR/MASTER_PORT (a free port), runs ``fn(*args)``, and its return
value comes back to the caller. Any failure in any rank, or the timeout, kills every
process and raises :class:`SpawnError` carrying the failing rank's traceback.

``fn`` must be importable (a module-level function). Processes start from a fork server
(``multiprocessing``'s ``forkserver``) that has imported torch and megatron.core once, so a
rank starts in a fraction of a second instead of re-importing them (seconds per process);
``fork`` of the caller itself is unsafe with torch threads. Each rank takes the caller's
current environment and working directory, as a ``spawn``-ed one would. Set
``MEGATRON_GROW_START_METHOD=spawn`` for plain ``spawn``.
"""

from __future__ import annotations

import builtins
import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from multiprocessing import reduction
from typing import Any

from megatron_grow.errors import SpawnError
from megatron_grow.parallel.ports import free_port

# Imported once by the fork server, inherited by every rank it forks: the slow imports. Only
# third-party modules, whose import-time state does not depend on a test's environment.
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt",
                      "megatron.core.dist_checkpointing", "megatron.core.optimizer", "megatron.core.pipeline_parallel"]
START_METHOD_ENV = "MEGATRON_GROW_START_METHOD"


def _start_context():
    method = os.environ.get(START_METHOD_ENV, "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"{START_METHOD_ENV}={method!r}: choose forkserver or spawn")
    if method == "forkserver" and "forkserver" in mp.get_all_start_methods():
        mp.set_forkserver_preload(FORKSERVER_PRELOAD)  # takes effect when the server first starts
        return mp.get_context("forkserver")
    return mp.get_context("spawn")


class _CallersFd:
    """One of the caller's file descriptors, handed to a rank as it starts (pickled while the process
    starts, the only time ``multiprocessing`` can pass a descriptor)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _attached_fd, (reduction.DupFd(self.fd),)


def _attached_fd(passed) -> int:
    return passed.detach()


def _callers_state() -> dict:
    stdio = []
    for fd in (1, 2):
        try:
            os.fstat(fd)
            stdio.append(_CallersFd(fd))
        except OSError:  # closed (e.g. a daemon): the rank keeps its own
            stdio.append(None)
    return {"env": dict(os.environ), "cwd": os.getcwd(), "stdio": stdio}


def _take_callers_state(caller: dict | None) -> None:
    """The environment and working directory the caller had at start (a forked rank would otherwise
    keep the fork server's, from whenever it started)."""
    if caller is None:
        return
    os.environ.clear()
    os.environ.update(caller["env"])
    os.chdir(caller["cwd"])
    for target, fd in zip((1, 2), caller["stdio"]):  # the caller's stdout/stderr, not the fork server's
        if fd is not None and fd != target:  # spawn passes them under their own numbers
            (sys.stdout if target == 1 else sys.stderr).flush()
            os.dup2(fd, target)
            os.close(fd)
    for spec in filter(None, caller["env"].get("PYTHONWARNINGS", "").split(",")):
        # -W filters are read at interpreter start-up, which a forked rank does not go through.
        action, _, category, *_ = (spec.split(":") + ["", "", ""])[:5]
        category_type = getattr(builtins, category, None)
        if action in ("ignore", "default", "error", "always", "module", "once") and isinstance(category_type, type) \
                and issubclass(category_type, Warning):
            warnings.filterwarnings(action, category=category_type)


def _rank_main(fn: Callable, args: Sequence, rank: int, world_size: int, port: int, result_dir: str,
               threads: int, extra_env: dict, caller: dict | None = None) -> None:
    _take_callers_state(caller)
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    os.environ.update(extra_env)
    # Imported only now, in the rank, after the caller's environment is in place: torch and our
    # modules read it at import (under ``spawn``; the fork server has imported torch already), and
    # the caller of run_in_processes need not pay for torch and Megatron-Core before it starts ranks.
    import torch

    from megatron_grow.parallel.init import destroy_distributed
    from megatron_grow.platform import cpu

    cpu.apply_cpu_adaptations()  # each spawned rank is an entry point
    torch.set_num_threads(threads)
    path = os.path.join(result_dir, f"rank{rank}.pkl")
    try:
        result = fn(*args)
        with open(path, "wb") as f:
            pickle.dump(("ok", result), f)
    except BaseException:  # report every failure, including SystemExit from CLIs
        with open(path, "wb") as f:
            pickle.dump(("error", traceback.format_exc()), f)
        raise
    finally:
        try:
            destroy_distributed()
        except Exception:
            pass


def run_in_processes(fn: Callable, world_size: int, args: Sequence = (), *, timeout: float = 300.0,
                     threads_per_rank: int | None = None, env: dict | None = None) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` ranks; return the list of per-rank results."""
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    ctx = _start_context()
    port = free_port()
    caller = _callers_state()
    with tempfile.TemporaryDirectory(prefix="mg_spawn_") as result_dir:
        procs = [ctx.Process(target=_rank_main, args=(fn, tuple(args), r, world_size, port, result_dir,
                                                      threads, dict(env or {}), caller), daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed = None
        try:
            while any(p.is_alive() for p in procs):
                for r, p in enumerate(procs):
                    if not p.is_alive() and p.exitcode not in (0, None):
                        failed = r
                if failed is not None:
                    break
                if time.monotonic() > deadline:
                    raise SpawnError(f"timed out after {timeout:.0f}s; "
                                     f"ranks still running: {[r for r, p in enumerate(procs) if p.is_alive()]}")
                time.sleep(0.05)
            if failed is None:
                failed = next((r for r, p in enumerate(procs) if p.exitcode != 0), None)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
        results = []
        errors = []
        for r in range(world_size):
            path = os.path.join(result_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"--- rank {r} ---\n{value}")
            results.append(value)
        if errors or failed is not None:
            detail = "\n".join(errors) or f"rank {failed} exited with code {procs[failed].exitcode}"
            raise SpawnError(f"distributed run failed:\n{detail}")
        return results
