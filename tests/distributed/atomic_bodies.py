"""Process bodies for tests/distributed/test_atomic_saves.py: real ``dist_checkpointing`` saves of
one small tensor through ``checkpoint.io.save_checkpoint``, with crashes injected at chosen
filesystem calls (a ``BaseException`` that no cleanup code catches, so the disk is left exactly
as a kill at that call would leave it)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from unittest import mock

import torch

from megatron_grow.checkpoint import io, paths
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.errors import CheckpointError
from megatron_grow.parallel.init import initialize_distributed


class Crash(BaseException):
    """Stands for SIGKILL at a filesystem call: nothing catches it, nothing cleans up."""


def _state(value: float, numel: int) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {"w": ShardedTensor.from_rank_offsets("w", torch.full((numel,), float(value)), replica_id=0)}


def save(root: str, iteration: int, value: float, numel: int = 64, keep_last: int | None = None) -> str:
    return io.save_checkpoint(root, iteration, _state(value, numel), {"value": value}, keep_last=keep_last)


def stored_value(ckpt_dir: str) -> float:
    """The value of tensor ``w`` in a complete checkpoint directory (loads it for real)."""
    io.check_shard_files(ckpt_dir)
    loaded = io.load_checkpoint(ckpt_dir, _state(-1.0, _numel(ckpt_dir)))
    return float(loaded["w"][0])


def _numel(ckpt_dir: str) -> int:
    md = io.read_storage_metadata(ckpt_dir)
    return int(md.state_dict_metadata["w"].size[0])


def tracker_state(root: str) -> dict:
    """What a loader finds: the tracked iteration and its value, or the error it gets."""
    try:
        iteration = paths.read_tracker(root)
        return {"iteration": iteration, "value": stored_value(paths.iteration_dir(root, iteration))}
    except CheckpointError as e:
        return {"error": str(e)}


MUTATING = [("os", "rename"), ("os", "replace"), ("shutil", "rmtree"), ("os", "remove")]


def resave_with_crashes(base: str, max_calls: int, exchange: bool) -> list:
    """:func:`resave_with_crash` at call 1, 2, ... until a save runs to its end (or ``max_calls``)."""
    initialize_distributed(ParallelConfig())
    results = []
    for crash_at in range(1, max_calls + 1):
        results.append(resave_with_crash(os.path.join(base, f"crash{crash_at}"), crash_at, exchange))
        if results[-1]["crashed"] is None:
            break
    return results


def resave_with_crash(root: str, crash_at: int, exchange: bool) -> dict:
    """Save iteration 2 twice (value 1, then 2), crashing the second save at its ``crash_at``-th
    filesystem-changing call; then report what a loader sees, and what is left after one more
    save of another iteration (3, no keep_last)."""
    save(root, 2, 1.0)
    calls = {"n": 0}

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise Crash(f"{fn.__name__}{args}")
            return fn(*args, **kwargs)
        return wrapper

    patches = [mock.patch(f"{mod}.{name}", counted(getattr(sys.modules[mod], name))) for mod, name in MUTATING]
    if hasattr(paths, "exchange_paths"):
        real_exchange = paths.exchange_paths
        patches.append(mock.patch.object(paths, "exchange_paths",
                                         counted(real_exchange) if exchange else (lambda a, b: False)))
    crashed = None
    with contextlib_stack(patches):
        try:
            save(root, 2, 2.0)
        except Crash as c:
            crashed = str(c)
    after_crash = tracker_state(root)
    save(root, 3, 3.0)
    kept = {}
    for it in (2, 3):
        d = paths.iteration_dir(root, it)
        kept[it] = stored_value(d) if os.path.isdir(d) else None
    return {"crashed": crashed, "after_crash": after_crash, "kept": kept, "calls": calls["n"],
            "left": sorted(os.listdir(root))}


def contextlib_stack(patches):
    import contextlib

    stack = contextlib.ExitStack()
    for p in patches:
        stack.enter_context(p)
    return stack


def fill_disk_then_save(root: str, small: int, big: int, mid_write: bool) -> dict:
    """Save a small checkpoint, then one too big for the disk: report the error and what is left.

    ``mid_write``: the disk fills up only after the save's free-space check (another process
    writing a big file), so the failure comes from inside torch's writer."""
    initialize_distributed(ParallelConfig())
    save(root, 1, 1.0, numel=small)
    filler = os.path.join(os.path.dirname(root), "filler")
    prepare = io._prepare_save_dir

    def prepare_then_fill(*args):
        prepare(*args)
        with open(filler, "wb") as f:  # leave about 64 KiB
            st = os.statvfs(os.path.dirname(root))
            f.write(b"\0" * max(st.f_bavail * st.f_frsize - 65536, 0))

    try:
        with mock.patch.object(io, "_prepare_save_dir", prepare_then_fill if mid_write else prepare):
            save(root, 2, 2.0, numel=big)
        error = None
    except CheckpointError as e:
        error = "CheckpointError: " + str(e)
    except Exception as e:  # the old behaviour: whatever torch raised
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "left": sorted(os.listdir(root)), "tracked": tracker_state(root)}


def failing_save(root: str) -> dict:
    """A save that raises mid-write (an object that cannot be pickled into common.pt)."""
    initialize_distributed(ParallelConfig())
    save(root, 1, 1.0)
    state = _state(2.0, 64)
    state["bad"] = lambda: None  # not picklable: dist_checkpointing raises while writing
    try:
        io.save_checkpoint(root, 2, state, {"value": 2.0})
        error = None
    except Exception as e:
        error = type(e).__name__
    return {"error": error, "left": sorted(os.listdir(root)), "tracked": tracker_state(root)}


if __name__ == "__main__":  # python -m tests.distributed.atomic_bodies fill ROOT SMALL BIG (world size 1)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    from megatron_grow.platform import cpu

    cpu.apply_cpu_adaptations()  # this process is an entry point
    result = fill_disk_then_save(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "mid")
    print("RESULT " + json.dumps(result))
    shutil.rmtree(sys.argv[2], ignore_errors=True)
