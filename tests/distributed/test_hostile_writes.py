"""Hostile input to the commands that write: nothing that exists is ever lost.

The list :data:`GUARD_CASES` is the writers' part of the project's hostile-input list (the grow
command's own bad-input list is ``CASES`` in ``test_grow_bad_input.py``): each case points a
writing command (export-hf, import-hf, preprocess) at a destination that is, contains or lies
inside what it reads, with ``--overwrite`` where the command has it. Each must give exit 2 and
one line, and leave every file it reads byte-identical (before the shared guard
``paths.check_destination``, ``export-hf --load C --hf-dir C --overwrite`` replaced the checkpoint
with two HF files and ``--load P/src --hf-dir P`` deleted ``P/src``).

Then ``grow --overwrite`` against a real complete old ``--save``, with real processes and signals:

* a built-in verify that fails (``--max-kl 1e-30``: exit 4) leaves the old --save byte-identical
  (it used to be retired by the swap, then the new one removed: nothing left);
* SIGINT while the grown checkpoint is written, and while it is verified: one line, exit 130, no
  traceback, the old --save byte-identical, no staging directory left;
* a second grow to a --save whose lock another live process holds: one line naming that process
  (pid, host, start), exit 2, nothing written; once the holder is SIGKILLed its lock is taken over,
  and the staging directory a dead process left is removed (and said so in one line) while one
  of a live process is kept.

    .venv/bin/pytest -q tests/distributed/test_hostile_writes.py
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from megatron_grow.checkpoint import paths
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.bodies import build_save_forward
from tests.distributed.test_grow_bad_input import (
    CLI_TIMEOUT,
    MODEL_RECIPE,
    PREFIX,
    RECIPE,
    REPO,
    assert_complete_checkpoint,
    assert_grown,
    cli_env,
    run_cli,
    run_cli_in_process,
    tree_digest,
)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """The tiny trained checkpoint every case reads (each case works on its own copy)."""
    root = str(tmp_path_factory.mktemp("hostile_writes_src") / "ckpt")
    run_in_processes(build_save_forward, 1, (load_recipe(MODEL_RECIPE).model, ParallelConfig(), root))
    assert_complete_checkpoint(root)
    return root

# ------------------------------------------------------------------------------------------------
# One guard for every writer


@dataclass
class Case:
    argv: list
    protected: list            # paths that must come out byte-identical
    expect: list = field(default_factory=list)


def _hf_dir(tmp: str, ckpt: str) -> str:
    """A real Hugging Face directory: the tiny checkpoint exported (a clean export, no guard involved)."""
    hf = os.path.join(tmp, "hf")
    proc = run_cli_in_process(["python", "-m", "megatron_grow", "export-hf", "--load", ckpt, "--hf-dir", hf,
                               "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return hf


def case_export_hf_into_its_checkpoint(tmp, ckpt, data):
    return Case(["export-hf", "--load", ckpt, "--hf-dir", ckpt, "--overwrite", "--quiet"], [ckpt],
                ["--hf-dir " + ckpt, "is the checkpoint"])


def case_export_hf_over_the_folder_holding_it(tmp, ckpt, data):
    return Case(["export-hf", "--load", ckpt, "--hf-dir", tmp, "--overwrite", "--quiet"], [ckpt],
                ["contains the checkpoint", ckpt])


def case_export_hf_iteration_dir_into_its_run(tmp, ckpt, data):
    return Case(["export-hf", "--load", paths.iteration_dir(ckpt, 1), "--hf-dir", ckpt, "--overwrite", "--quiet"],
                [ckpt], ["contains the checkpoint"])


def case_export_hf_inside_the_checkpoint(tmp, ckpt, data):
    return Case(["export-hf", "--load", ckpt, "--hf-dir", os.path.join(ckpt, "hf"), "--quiet"], [ckpt],
                ["is inside the checkpoint"])


def case_export_hf_through_a_link_to_it(tmp, ckpt, data):
    link = os.path.join(tmp, "link")
    os.symlink(ckpt, link)
    return Case(["export-hf", "--load", ckpt, "--hf-dir", link, "--overwrite", "--quiet"], [ckpt],
                ["resolves to", "the checkpoint"])


def case_import_hf_into_its_hf_dir(tmp, ckpt, data):
    hf = _hf_dir(tmp, ckpt)
    return Case(["import-hf", "--hf-dir", hf, "--save", hf, "--overwrite", "--quiet"], [hf],
                ["--save " + hf, "is the --hf-dir model"])


def case_import_hf_inside_its_hf_dir(tmp, ckpt, data):
    hf = _hf_dir(tmp, ckpt)
    return Case(["import-hf", "--hf-dir", hf, "--save", os.path.join(hf, "ckpt"), "--quiet"], [hf],
                ["is inside the --hf-dir model"])


def case_preprocess_output_over_its_input(tmp, ckpt, data):
    text = os.path.join(tmp, "corpus.bin")  # a text file that happens to carry the output's name
    with open(text, "w", encoding="utf-8") as f:
        f.write("In the beginning God created the heaven and the earth.\n\nAnd the earth was without form.\n")
    return Case(["preprocess", "--input", text, "--tokenizer-model", data["tokenizer"], "--output-prefix",
                 os.path.join(tmp, "corpus"), "--workers", "1", "--no-progress"], [tmp],
                ["--output-prefix", "is the --input file", text])


GUARD_CASES: dict[str, Callable] = {
    "export_hf_into_its_checkpoint": case_export_hf_into_its_checkpoint,
    "export_hf_over_the_folder_holding_it": case_export_hf_over_the_folder_holding_it,
    "export_hf_iteration_dir_into_its_run": case_export_hf_iteration_dir_into_its_run,
    "export_hf_inside_the_checkpoint": case_export_hf_inside_the_checkpoint,
    "export_hf_through_a_link_to_it": case_export_hf_through_a_link_to_it,
    "import_hf_into_its_hf_dir": case_import_hf_into_its_hf_dir,
    "import_hf_inside_its_hf_dir": case_import_hf_inside_its_hf_dir,
    "preprocess_output_over_its_input": case_preprocess_output_over_its_input,
}


@pytest.mark.parametrize("case", list(GUARD_CASES))
def test_writer_never_writes_over_what_it_reads(case, source, kjv_dataset, tmp_path):
    tmp = str(tmp_path / "P")
    os.makedirs(tmp)
    ckpt = os.path.join(tmp, "src")
    shutil.copytree(source, ckpt)
    c = GUARD_CASES[case](tmp, ckpt, kjv_dataset)
    before = {p: tree_digest(p) for p in c.protected}
    proc = run_cli_in_process(["python", "-m", "megatron_grow", *c.argv])
    where = f"\nargv: {c.argv}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, f"exit status {proc.returncode}, expected 2{where}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), where
    for fragment in c.expect:
        assert fragment in lines[0], f"error does not mention {fragment!r}{where}"
    for p in c.protected:
        assert tree_digest(p) == before[p], f"{p} changed{where}"


# ------------------------------------------------------------------------------------------------
# grow --overwrite keeps the old --save until the new one is complete and verified


def _old_save(source: str, tmp_path) -> tuple[str, dict]:
    """A complete, loadable old --save (a copy of the source checkpoint) and its digest."""
    dst = str(tmp_path / "dst")
    shutil.copytree(source, dst)
    return dst, tree_digest(dst)


def _left_beside(dst: str) -> list[str]:
    parent, name = os.path.split(dst)
    return sorted(n for n in os.listdir(parent) if n.startswith(name) and n != name or n.startswith(f".{name}"))


def _grow(load: str, save: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_grow", "grow", "--load", load, "--save", save, "--recipe", RECIPE,
            "--overwrite", "--quiet", *extra]


def test_overwrite_whose_verify_fails_keeps_the_old_save(source, tmp_path):
    dst, before = _old_save(source, tmp_path)
    proc = run_cli(_grow(source, dst, "--max-kl", "1e-30"))
    where = f"\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 4, where
    assert "Traceback" not in proc.stderr, where
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--max-kl" in proc.stderr, where
    assert tree_digest(dst) == before, f"the old --save was lost or changed{where}"
    assert _left_beside(dst) == [], where


# A terminal starts a command with SIGINT at its default and no signal blocked. The test process may
# have changed either (a library loaded into pytest), and a child inherits both across exec: a SIGINT
# blocked or ignored there would never reach the command under test. This wrapper clears both, then
# becomes the command (exec keeps the pid, so the signal goes to the command itself).
_AS_FROM_A_SHELL = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_SETMASK, []); "
                    "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])")


def _interrupt_when(argv: list[str], pattern: str) -> subprocess.CompletedProcess:
    """Start ``argv`` as a shell would; SIGINT it (what Ctrl-C sends) as soon as ``pattern`` matches a path."""
    proc = subprocess.Popen([sys.executable, "-c", _AS_FROM_A_SHELL, *argv], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CLI_TIMEOUT
    while not glob.glob(pattern) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    seen = bool(glob.glob(pattern))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=CLI_TIMEOUT)
    assert seen, f"{pattern} never appeared; exit {proc.returncode}\n{err}"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# the shards being written / the staged checkpoint complete (its tracker written): verify runs
MOMENTS = {"save": "{dst}.staging-*/iter_*.incomplete-*/__0_*.distcp",
           "verify": "{dst}.staging-*/" + paths.TRACKER_FILENAME}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_ctrl_c_during_overwrite_is_one_line_and_keeps_the_old_save(source, tmp_path, moment):
    dst, before = _old_save(source, tmp_path)
    proc = _interrupt_when(_grow(source, dst), MOMENTS[moment].format(dst=dst))
    where = f"\nexit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 130, where
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, where
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-grow: interrupted"), where
    assert tree_digest(dst) == before, f"the old --save was lost or changed{where}"
    assert _left_beside(dst) == [], where


# ------------------------------------------------------------------------------------------------
# One grow per --save


_HOLD_LOCK = """
import sys
from megatron_grow.checkpoint.paths import DestinationLock
DestinationLock(sys.argv[1], "grow").acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_second_grow_to_the_same_save_is_refused_then_takes_over_a_dead_lock(source, tmp_path):
    dst, before = _old_save(source, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, dst], cwd=REPO, env=cli_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = run_cli(_grow(source, dst, "--no-verify"))
    finally:
        holder.kill()  # SIGKILL: the lock file stays, its holder is gone
        holder.wait(timeout=60)
    where = f"\nstdout:\n{refused.stdout}\nstderr:\n{refused.stderr}"
    assert refused.returncode == 2, where
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), where
    for fragment in ("being written by another grow", f"pid {holder.pid}", socket.gethostname(), "started"):
        assert fragment in lines[0], f"{fragment!r} not named{where}"
    assert tree_digest(dst) == before, where

    # What killed grows left beside --save: a staging directory of a dead process, one of a live one.
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = f"{dst}{paths.STAGING_MARK}{host}-{dead.pid}-0123abcd"
    alive = f"{dst}{paths.STAGING_MARK}{host}-{os.getpid()}-4567ef01"
    for d in (stale, alive):
        os.makedirs(os.path.join(d, "iter_0000001"))
    proc = run_cli(_grow(source, dst, "--no-verify"))
    where = f"\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, where
    assert_grown(dst)
    said = [line for line in proc.stdout.splitlines() if "staging" in line]
    assert len(said) == 1 and os.path.basename(stale) in said[0], where
    assert not os.path.exists(stale) and os.path.isdir(alive), where
    assert _left_beside(dst) == [os.path.basename(alive)], where


# ------------------------------------------------------------------------------------------------
# Full disks (a real tmpfs of a given size, mounted in a private mount namespace)


def _small_disk_unavailable() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"mounting a tmpfs is not permitted here: {probe.stderr.strip()}"


def _on_small_disk(disk, size_kib: int, argv: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``argv`` with a ``size_kib`` tmpfs mounted at ``disk``; returns it and what it left there."""
    reason = _small_disk_unavailable()
    if reason:
        pytest.skip(reason)
    disk.mkdir(exist_ok=True)
    command = " ".join(argv)
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size_kib}k tmpfs {disk} && "
                           f"{command}; rc=$?; echo LEFT; find {disk} -mindepth 1 | sort; exit $rc"],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=CLI_TIMEOUT)
    out, _, left = proc.stdout.partition("LEFT\n")
    return subprocess.CompletedProcess(argv, proc.returncode, out, proc.stderr), left.split()


def _assert_one_disk_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    where = f"\nexit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, where
    assert "Traceback" not in proc.stderr and "Errno" not in proc.stderr, where
    lines = [line for line in proc.stderr.splitlines() if line.startswith("megatron-grow")]
    assert len(lines) == 1 and lines[0].startswith(PREFIX), where
    for fragment in ("no space left on device", *fragments):
        assert fragment in lines[0], f"{fragment!r} not in the error{where}"


# The grown tiny_depth_width checkpoint: 927,040 fp32 parameters (3.5 MiB, what the old estimate
# counted) take about 4.7 MiB on disk (torch.save framing per item, .metadata, common.pt). A 4.2 MiB
# disk lies between: the save must be refused before a byte is written, not fail inside the writers.
GROW_DISK_KIB = 4300


def test_grow_onto_a_disk_too_small_is_refused_before_writing(source, tmp_path):
    disk = tmp_path / "small"
    save = str(disk / "grown")
    proc, left = _on_small_disk(disk, GROW_DISK_KIB, _grow(source, save, "--no-verify"))
    _assert_one_disk_line(proc, save, "needs about")
    assert left == [], f"left on the full disk: {left}"


# A tiny training run's first save (weights, Adam state, scheduler, RNG) takes about 6 MiB; its
# parameters alone (what the old estimate counted, without the optimizer's factories) 1.1 MiB.
TRAIN_DISK_KIB = 5500


def test_training_save_onto_a_disk_too_small_is_one_line(kjv_dataset, tmp_path):
    from tests.distributed.conftest import write_recipe

    disk = tmp_path / "small"
    run = str(disk / "run")
    recipe = write_recipe(tmp_path / "recipe.yaml", kjv_dataset, run, training={"train_iters": 3})
    proc, left = _on_small_disk(disk, TRAIN_DISK_KIB,
                                [sys.executable, "-m", "megatron_grow", "train", "--config", recipe])
    _assert_one_disk_line(proc, run, "needs about")
    assert left in ([], [run]), f"left on the full disk: {left}"


def test_preprocess_onto_a_full_disk_is_one_line_and_leaves_no_tmp(kjv_dataset, tmp_path):
    disk = tmp_path / "small"
    text = os.path.join(kjv_dataset["dir"], "kjv_part.txt")  # ~300 KB of text: ~100 KiB of tokens
    argv = [sys.executable, "-m", "megatron_grow", "preprocess", "--input", text, "--tokenizer-model",
            kjv_dataset["tokenizer"], "--output-prefix", str(disk / "kjv"), "--workers", "1", "--no-progress"]
    proc, left = _on_small_disk(disk, 64, argv)
    _assert_one_disk_line(proc, str(disk / "kjv.bin"))
    assert left == [], f"left on the full disk: {left}"


# ------------------------------------------------------------------------------------------------
# Processes: nothing outlives a killed trainer or a killed worker


def test_sigkilled_trainer_leaves_no_forked_writer_behind(kjv_dataset, tmp_path):
    """SIGKILL of ``train`` while a checkpoint is being written: Megatron-Core's writer forks
    helpers then (holding the dataset files); none may be left, reparented, once it is dead."""
    import psutil

    from tests.distributed.conftest import write_recipe

    run = str(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", kjv_dataset, run, training={"train_iters": 100000},
                          checkpoint={"save_interval": 1})
    proc = subprocess.Popen([sys.executable, "-m", "megatron_grow", "train", "--config", recipe], cwd=REPO,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    forked: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + CLI_TIMEOUT
        while len(forked) == 0 and proc.poll() is None and time.monotonic() < deadline:
            if glob.glob(os.path.join(run, "iter_*" + paths.INCOMPLETE_MARK + "*")):  # a save is under way
                for child in psutil.Process(proc.pid).children(recursive=True):
                    forked.setdefault(child.pid, child)
            time.sleep(0.001)
        assert forked, f"no helper process seen during a save (exit {proc.poll()})"
        proc.kill()
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(list(forked.values()), timeout=10)
        assert alive == [], f"left running after the trainer was SIGKILLed: {[(p.pid, p.ppid()) for p in alive]}"
    finally:
        for child in forked.values():
            try:
                child.kill()
            except psutil.Error:
                pass


def test_sigkilled_worker_under_launch_does_not_leave_its_peer_running(kjv_dataset, tmp_path):
    """SIGKILL of one of two ``launch`` workers (nothing reaches the launcher): the peer either fails
    on the broken connection by itself or, when it waits for a rank that is gone, is stopped by
    the launcher after a few seconds (``stranded_workers``; the waiting case itself is
    ``tests/unit/test_launch.py``), not after torchrun's 600 s shutdown timeout. No worker is left."""
    import psutil

    from tests.distributed.test_launch import _finish, _launch, _long_recipe, _wait_for

    log = str(tmp_path / "log")
    proc = _launch(["train", "--config", _long_recipe(tmp_path, kjv_dataset)], log)
    _wait_for(log, "iter       2", proc)
    workers = psutil.Process(proc.pid).children()
    next(w for w in workers if w.environ().get("RANK") == "1").kill()
    rc, out = _finish(proc, log)
    assert rc != 0, out[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [], f"workers left running: {[w.pid for w in alive]}\n{out[-3000:]}"


def test_disk_filling_during_a_grow_is_one_line_and_leaves_no_partial_files(source, tmp_path):
    """The free-space check passes (an 8 MiB disk, the grown checkpoint needs 4.8 MiB), then another
    writer takes all but 64 KiB: the writer threads hit ENOSPC mid-file. One line, no thread
    tracebacks, nothing of the grow left on the disk."""
    disk = tmp_path / "small"
    save, filler = str(disk / "grown"), str(disk / "filler")
    argv = [sys.executable, "-m", "tests.distributed.fill_during_save", filler, "--", *_grow(source, save,
                                                                                              "--no-verify")[3:]]
    proc, left = _on_small_disk(disk, 8192, argv)
    _assert_one_disk_line(proc)
    assert "Exception in thread" not in proc.stderr, proc.stderr[-4000:]
    assert left == [filler], f"left on the full disk: {left}"
