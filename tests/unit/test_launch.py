"""megatron_grow.parallel.launch / cli.launch: exit-code mapping, argument handling (no processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_grow.cli.launch import split_argv
from megatron_grow.parallel import launch, rank_status
from megatron_grow.parallel.stranded_workers import StrandedWorkerGuard

COMMANDS = {"train", "grow", "verify", "launch"}


def test_combined_exit_code_prefers_preempted_then_bad_input():
    assert launch.combined_exit_code({"0": 3, "1": 0}, 1) == 3
    assert launch.combined_exit_code({"0": 2, "1": 3}, 1) == 3
    assert launch.combined_exit_code({"0": 2, "1": 2}, 1) == 2
    assert launch.combined_exit_code({"0": 0, "1": 0}, 0) == 0
    assert launch.combined_exit_code({"0": 1}, 1) == 1
    assert launch.combined_exit_code({}, 143) == 143  # killed before any worker reported


def test_record_and_read_worker_codes(tmp_path, monkeypatch):
    monkeypatch.setenv(rank_status.STATUS_DIR_ENV, str(tmp_path))
    for rank, code in (("0", 3), ("1", 2)):
        monkeypatch.setenv("RANK", rank)
        rank_status.record_exit_code(code)
    (tmp_path / "rank-9.rc").write_text("garbage")
    assert rank_status.worker_exit_codes(str(tmp_path)) == {"0": 3, "1": 2}


def test_record_outside_launch_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(rank_status.STATUS_DIR_ENV, raising=False)
    rank_status.record_exit_code(2)
    assert os.listdir(tmp_path) == []


def test_torchrun_arguments_forward_sigusr1_and_wait_for_saves(monkeypatch):
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    args = launch.torchrun_arguments(["--standalone", "--nproc-per-node", "2", "--module", "megatron_grow", "train"])
    assert "SIGUSR1" in args.signals_to_handle.split(",") and "SIGTERM" in args.signals_to_handle.split(",")
    assert args.shutdown_timeout == launch.DEFAULT_SHUTDOWN_TIMEOUT
    assert args.training_script == "megatron_grow" and args.training_script_args == ["train"]
    args = launch.torchrun_arguments(["--shutdown-timeout", "45", "--signals-to-handle", "SIGTERM", "x.py"])
    assert args.shutdown_timeout == 45 and args.signals_to_handle.split(",")[0] == "SIGTERM"


def test_split_argv_at_first_command():
    assert split_argv(["--nproc-per-node", "2", "train", "--config", "r.yaml"], COMMANDS) == (
        ["--nproc-per-node", "2"], ["train", "--config", "r.yaml"])
    assert split_argv(["--rdzv-id", "train", "grow", "--load", "x"], COMMANDS) == (
        ["--rdzv-id", "train"], ["grow", "--load", "x"])
    assert split_argv(["--standalone"], COMMANDS) == (["--standalone"], [])



def _sleeper(ignore_sigterm: bool) -> subprocess.Popen:
    """A stand-in worker: dies of SIGTERM, or ignores it as one that remembered it for later."""
    code = ("import signal, time\n"
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_sigterm else "")
            + "print('ready', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline().strip() == b"ready"
    return proc


@pytest.fixture
def dying_and_remembering_workers():
    """Two stand-in workers: one dies of SIGTERM, one outlives it; both are gone afterwards."""
    died, survivor = _sleeper(ignore_sigterm=False), _sleeper(ignore_sigterm=True)
    yield died, survivor, [psutil.Process(died.pid), psutil.Process(survivor.pid)]
    for proc in (died, survivor):
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("clean_exit_recorded", [False, True])
def test_guard_stops_a_worker_stranded_by_a_peer_that_died_unsaved(tmp_path, clean_exit_recorded,
                                                                    dying_and_remembering_workers):
    died, stranded, handles = dying_and_remembering_workers
    if clean_exit_recorded:  # the dead one saved and exited 3: the other is finishing its own exit
        (tmp_path / "rank-0.rc").write_text("3\n")
    with StrandedWorkerGuard(str(tmp_path), workers=lambda: handles, grace_s=0.5) as guard:
        for worker in (died, stranded):  # a stop signal, as torchrun forwards it: one dies of it
            worker.send_signal(signal.SIGTERM)
        assert died.wait(timeout=20) == -signal.SIGTERM
        if clean_exit_recorded:
            time.sleep(2.0)  # well past the grace period
            assert stranded.poll() is None and guard.killed == []
        else:
            assert stranded.wait(timeout=20) == -signal.SIGKILL
            assert guard.killed == [stranded.pid]


def test_guard_stops_the_peer_of_a_worker_sigkilled_with_no_signal_to_the_launcher(
        tmp_path, dying_and_remembering_workers):
    """SIGKILL of one worker (the OOM killer, a user): nothing reaches the launcher, the peer is
    left waiting for a rank that is gone; it is stopped after the grace period."""
    died, stranded, handles = dying_and_remembering_workers
    with StrandedWorkerGuard(str(tmp_path), workers=lambda: handles, grace_s=0.5) as guard:
        time.sleep(1.0)  # both running, well past the grace period: nothing is stopped
        assert guard.killed == [] and stranded.poll() is None
        died.kill()
        assert died.wait(timeout=20) == -signal.SIGKILL
        assert stranded.wait(timeout=20) == -signal.SIGKILL
        assert guard.killed == [stranded.pid]
