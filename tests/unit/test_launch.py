"""megatron_grow.parallel.launch / cli.launch: exit-code mapping, argument handling (no processes)."""

from __future__ import annotations

import os

from megatron_grow.cli.launch import split_argv
from megatron_grow.parallel import launch

COMMANDS = {"train", "grow", "verify", "launch"}


def test_combined_exit_code_prefers_preempted_then_bad_input():
    assert launch.combined_exit_code({"0": 3, "1": 0}, 1) == 3
    assert launch.combined_exit_code({"0": 2, "1": 3}, 1) == 3
    assert launch.combined_exit_code({"0": 2, "1": 2}, 1) == 2
    assert launch.combined_exit_code({"0": 0, "1": 0}, 0) == 0
    assert launch.combined_exit_code({"0": 1}, 1) == 1
    assert launch.combined_exit_code({}, 143) == 143  # killed before any worker reported


def test_record_and_read_worker_codes(tmp_path, monkeypatch):
    monkeypatch.setenv(launch.STATUS_DIR_ENV, str(tmp_path))
    for rank, code in (("0", 3), ("1", 2)):
        monkeypatch.setenv("RANK", rank)
        launch.record_exit_code(code)
    (tmp_path / "rank-9.rc").write_text("garbage")
    assert launch.worker_exit_codes(str(tmp_path)) == {"0": 3, "1": 2}


def test_record_outside_launch_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(launch.STATUS_DIR_ENV, raising=False)
    launch.record_exit_code(2)
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
