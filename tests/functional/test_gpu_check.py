"""scripts/gpu/check.sh: its --dry-run (every step on tiny shapes, CPU-able) writes the files the
GPU call would, and bad arguments are refused with one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "gpu", "check.sh")
PHASES = ["matmul_ceiling", "train", "train_sequential", "transformers", "grow", "resume_grown", "profile"]


def _run(*args, timeout=1800):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHON"] = sys.executable  # this test's interpreter (the script defaults to python3)
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_its_files(tmp_path):
    out = tmp_path / "check"
    proc = _run("--out", str(out), "--dry-run", "--tests-timeout", "600")
    log = (out / "check.log").read_text() if (out / "check.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{log}"
    for name in ("check.log", "env.txt", "gpu_tests.log", "gpu_tests.xml", "bench.log", "summary.json",
                 "summary.md", "profile.txt"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    for phase in PHASES:
        assert summary[phase]["ok"], (phase, summary[phase])
    train, resumed = summary["train"], summary["resume_grown"]
    assert train["tokens_per_s"] > 0 and train["iteration"] == summary["shape"]["train_steps"]
    assert resumed["layers"] == 2 * train["layers"]  # depth x2 growth, then trained on
    assert resumed["iteration"] == train["iteration"] + summary["shape"]["resume_steps"]
    assert summary["transformers"]["transformers_class"] == "Qwen3MoeForCausalLM"
    assert summary["comparison"]["tokens_per_s_vs_transformers"] > 0
    assert "Self CPU" in (out / "profile.txt").read_text()
    table = (out / "summary.md").read_text()
    assert "| train |" in table and "tokens_per_s_vs_transformers" in table
    if not torch.cuda.is_available():
        tests_log = (out / "gpu_tests.log").read_text()
        assert "needs a CUDA GPU; this machine has none" in tests_log and "passed" not in tests_log
        assert train["mfu"] is None and "no GPU" in train["peak"]  # no peak on a CPU: no MFU, said so
    assert "every step ran" in log


@pytest.mark.parametrize("args,expect", [
    ([], "--out DIR is required"),
    (["--out", "/tmp/x", "--wheels", "/nonexistent/wheels"], "is not a folder"),
    (["--out", "/tmp/x", "--frobnicate"], "unknown argument '--frobnicate'"),
])
def test_bad_arguments_exit_2_with_one_line(args, expect):
    proc = _run(*args, timeout=60)
    assert proc.returncode == 2
    assert expect in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
