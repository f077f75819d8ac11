"""run_in_processes: ranks forked from the preloaded fork server see the caller's environment and
working directory as they are at the call (as spawn-ed ones would), report errors with the rank's
traceback, and the plain ``spawn`` method stays available."""

from __future__ import annotations

import os
import sys

import pytest

from megatron_grow.errors import SpawnError
from megatron_grow.parallel.spawn import START_METHOD_ENV, run_in_processes


def _report() -> dict:
    import torch

    return {"var": os.environ.get("MG_SPAWN_TEST_VAR"), "gone": "MG_SPAWN_TEST_GONE" in os.environ,
            "cwd": os.getcwd(), "rank": int(os.environ["RANK"]), "threads": torch.get_num_threads(),
            "extra": os.environ.get("MG_EXTRA")}


def _say_hello() -> None:
    print(f"hello from rank {os.environ['RANK']}", flush=True)
    print(f"warning from rank {os.environ['RANK']}", file=sys.stderr, flush=True)


def _nothing() -> None:
    return None


def _fail() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("rank one says no")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_ranks_take_the_callers_environment_and_directory(method, tmp_path, monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, method)
    for value, where in (("first", tmp_path / "a"), ("second", tmp_path / "b")):
        where.mkdir()
        monkeypatch.chdir(where)
        monkeypatch.setenv("MG_SPAWN_TEST_VAR", value)
        monkeypatch.setenv("MG_SPAWN_TEST_GONE", "1")
        monkeypatch.delenv("MG_SPAWN_TEST_GONE")  # set earlier in this process, removed before the call
        results = run_in_processes(_report, 2, threads_per_rank=1, env={"MG_EXTRA": "x"})
        assert [r["rank"] for r in results] == [0, 1]
        for r in results:
            assert r == dict(r, var=value, gone=False, cwd=str(where), threads=1, extra="x")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_rank_output_reaches_the_callers_stdout_and_stderr(method, capfd, monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, method)
    with capfd.disabled():  # the fork server (if this starts it) sees the terminal, not this capture
        run_in_processes(_nothing, 1)
    run_in_processes(_say_hello, 2)
    out, err = capfd.readouterr()
    assert "hello from rank 0" in out and "hello from rank 1" in out, (out, err)
    assert "warning from rank 0" in err and "warning from rank 1" in err, (out, err)


@pytest.mark.slow
def test_a_failing_rank_is_reported_with_its_traceback(monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, "forkserver")
    with pytest.raises(SpawnError, match=r"(?s)rank 1.*ValueError: rank one says no"):
        run_in_processes(_fail, 2)


def test_unknown_start_method_is_refused(monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, "fork")
    with pytest.raises(ValueError, match="choose forkserver or spawn"):
        run_in_processes(_report, 1)
