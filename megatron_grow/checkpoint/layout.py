"""Megatron-LM's checkpoint directory layout, and atomic updates to it.

    ROOT/
      latest_checkpointed_iteration.txt      the tracker: one integer (Megatron-LM format)
      iter_0000100/                          one torch_dist checkpoint (dist_checkpointing)
        metadata.json, common.pt, __*.distcp
        megatron_grow.json                   our manifest (recipe, counters, lineage), plain JSON
      iter_0000200.incomplete-<id>/          a save in progress; never read, removed on the next save

A checkpoint becomes visible only by renaming its finished directory to ``iter_N`` and
then rewriting the tracker with write-fsync-rename, so a crash at any moment leaves the
previous complete checkpoint as the one that loads.
"""

from __future__ import annotations

import os
import re

from megatron_grow.errors import CheckpointError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MANIFEST_FILENAME = "megatron_grow.json"
INCOMPLETE_MARK = ".incomplete-"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def list_iterations(root: str) -> list[int]:
    """Complete checkpoints under ``root``, oldest first (incomplete saves are not listed)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _ITER_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, "metadata.json")):
            found.append(int(m.group(1)))
    return sorted(found)


def read_tracker(root: str) -> int:
    """The iteration named by the tracker; every way it can be wrong is a CheckpointError."""
    if not os.path.exists(root):
        raise CheckpointError(f"checkpoint path does not exist: {root}")
    if not os.path.isdir(root):
        raise CheckpointError(f"checkpoint path is not a directory: {root}")
    tracker = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"no {TRACKER_FILENAME} in {root}: not a Megatron-LM checkpoint directory "
                              f"(or no save has completed there)")
    with open(tracker, encoding="utf-8") as f:
        text = f.read().strip()
    if text == "release":
        raise CheckpointError(f"{tracker} says 'release': release checkpoints are not supported; "
                              "point at an iteration checkpoint")
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{tracker} does not hold an iteration number (found {text!r})") from None
    if not os.path.isdir(iteration_dir(root, iteration)):
        raise CheckpointError(f"{tracker} names iteration {iteration}, but "
                              f"{iteration_dir(root, iteration)} does not exist")
    return iteration


def resolve_checkpoint_dir(path: str, iteration: int | None = None) -> tuple[str, int]:
    """Accept a run root (uses the tracker, or ``iteration``) or an ``iter_N`` directory."""
    m = _ITER_RE.match(os.path.basename(os.path.normpath(path)))
    if m and iteration is None:
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint directory does not exist: {path}")
        return path, int(m.group(1))
    if iteration is None:
        iteration = read_tracker(path)
    ckpt = iteration_dir(path, iteration)
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"iteration {iteration} not found under {path}")
    return ckpt, iteration


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (the data must be durable before the rename)."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_tracker(root: str, iteration: int) -> None:
    write_text_atomic(os.path.join(root, TRACKER_FILENAME), f"{iteration}\n")


def incomplete_dirs(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, n) for n in os.listdir(root) if INCOMPLETE_MARK in n]
