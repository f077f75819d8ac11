"""Saves never lose the previous checkpoint: re-saving an iteration, a full disk, a failing save.

Real ``dist_checkpointing`` saves (one gloo process) through ``checkpoint.io.save_checkpoint``.

* Re-saving an existing iteration is crashed at every filesystem-changing call in turn (a
  ``BaseException`` raised at the call, which no cleanup catches: the disk is left as a kill
  there would leave it). Each time the tracker must name a complete directory holding the old
  or the new value (with the atomic exchange; the two-rename fallback may leave the old copy
  aside for a moment), and after one more save of another iteration the re-saved one must
  still be there and complete. The old code (rename aside to an ``.incomplete-`` name) left the
  tracker naming nothing, and the next save's cleanup then deleted both copies.
* A disk that fills up during a save (a real ``tmpfs`` of a few hundred KiB in a private mount
  namespace, ``unshare -rm``) gives one ``CheckpointError`` naming "no space left on device",
  the staging directory is gone and the previous checkpoint is the tracked one.
* A save that raises mid-write removes its staging directory; the tracker is unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed import atomic_bodies

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_CALLS = 12  # a re-save makes fewer filesystem-changing calls than this (asserted below)


def _resave(tmp_path, exchange: bool) -> list:
    found = run_in_processes(atomic_bodies.resave_with_crashes, 1, (str(tmp_path), MAX_CALLS, exchange))[0]
    results = list(enumerate(found, start=1))
    # the last save ran to its end: every call has been tried
    assert results[-1][1]["crashed"] is None, f"re-save made more than {MAX_CALLS} calls"
    assert len(results) >= 3, results
    return results


def test_resave_crash_never_leaves_the_tracker_naming_nothing(tmp_path):
    for crash_at, r in _resave(tmp_path, exchange=True):
        where = f"crash at call {crash_at} ({r['crashed']}): {r}"
        assert r["after_crash"].get("iteration") == 2, where
        assert r["after_crash"]["value"] in (1.0, 2.0), where
        assert r["kept"][2] in (1.0, 2.0), f"iteration 2 lost by the next save: {where}"
        assert r["kept"][3] == 3.0, where
        assert not [n for n in r["left"] if "." in n and not n.endswith(".txt")], f"leftovers: {where}"
        if r["crashed"] is None:
            assert r["after_crash"]["value"] == 2.0, where


def test_resave_crash_with_two_rename_fallback_keeps_a_copy(tmp_path):
    """Without RENAME_EXCHANGE: the next save puts the old copy back; nothing is deleted twice."""
    windows = 0
    for crash_at, r in _resave(tmp_path, exchange=False):
        where = f"crash at call {crash_at} ({r['crashed']}): {r}"
        if "error" in r["after_crash"]:
            windows += 1
            assert "iter_0000002" in r["after_crash"]["error"], where
        assert r["kept"][2] in (1.0, 2.0), f"iteration 2 lost by the next save: {where}"
        assert r["kept"][3] == 3.0, where
        assert not [n for n in r["left"] if "." in n and not n.endswith(".txt")], f"leftovers: {where}"
    assert windows <= 1, "the fallback has at most one crash point between its two renames"


def test_failed_save_removes_its_staging_directory(tmp_path):
    root = str(tmp_path / "run")
    r = run_in_processes(atomic_bodies.failing_save, 1, (root,))[0]
    assert r["error"] is not None, r
    assert r["left"] == ["iter_0000001", "latest_checkpointed_iteration.txt"], r
    assert r["tracked"] == {"iteration": 1, "value": 1.0}, r


def _can_mount_tmpfs() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null "
                            "|| mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


@pytest.mark.parametrize("when", ["before", "mid"])
def test_full_disk_during_save_is_one_error_and_leaves_previous(tmp_path, when):
    """``before``: the disk is already too full (found before writing); ``mid``: it fills up while
    torch writes the shards (torch reports its own error; the free space tells what happened)."""
    reason = _can_mount_tmpfs()
    if reason:
        pytest.skip(reason)
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    root = str(mnt / "run")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    # 64 Ki floats (256 KiB) fit in 1 MiB; then 512 Ki floats (2 MiB) do not, nor do 96 Ki (384 KiB)
    # once the disk has been filled behind the save's back.
    big = 524288 if when == "before" else 98304
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && exec {sys.executable} -m tests.distributed.atomic_bodies "
              f"fill {root} 65536 {big} {when}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["error"] and r["error"].startswith("CheckpointError: ") and "no space left on device" in r["error"], r
    assert "\n" not in r["error"], r
    assert r["left"] == ["iter_0000001", "latest_checkpointed_iteration.txt"], f"staging left behind: {r}"
    assert r["tracked"] == {"iteration": 1, "value": 1.0}, r
