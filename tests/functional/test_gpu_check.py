"""scripts/gpu/check.sh on a CPU machine: refused in seconds with the preflight's line (exit 2);
its --dry-run writes every phase's JSON as the phase ends; a phase past its time limit is
recorded as such and the finished phases keep their numbers; the GPU test tier asked for with
--require-gpu exits 2 instead of reporting skipped tests as success; bad arguments: one line, 2.

CUDA_VISIBLE_DEVICES is emptied for every run, so these are the no-GPU answers on any machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "gpu", "check.sh")
PHASES = ["grouped_mm", "matmul_ceiling", "data", "growth_numerics", "train", "profile", "transformers",
          "train_sequential"]
NO_CUDA_LINE = "gpu-check: no CUDA GPU on this machine"


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHON"] = sys.executable  # this test's interpreter (the script defaults to python3)
    env["CUDA_VISIBLE_DEVICES"] = ""  # a machine without CUDA, whatever runs the test
    return env


def _run(*args, timeout=900):
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _phase_files(out):
    return sorted((out / "phases").glob("*.json"))


def test_a_cpu_machine_is_refused_by_the_preflight(tmp_path):
    out = tmp_path / "check"
    (out / "phases").mkdir(parents=True)
    (out / "summary.md").write_text("| train | yes | 1.0 | 99,999 tok/s |  <- an earlier run")
    (out / "phases" / "04_train.json").write_text("{}")
    proc = _run("--out", str(out), timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert NO_CUDA_LINE in output and "99,999" not in output
    assert not (out / "summary.md").exists() and _phase_files(out) == []  # nothing old passes for new
    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["cuda_available"] is False and preflight["torch"]


def test_dry_run_writes_every_phase_as_it_ends(tmp_path):
    out = tmp_path / "check"
    proc = _run("--out", str(out), "--dry-run")
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    files = _phase_files(out)
    assert [f.stem.split("_", 1)[1] for f in files] == PHASES + ["done"]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert stamps == sorted(stamps)  # one after the other, not all at the end
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    for phase in PHASES:
        assert summary[phase]["ok"], (phase, summary[phase])
    train = summary["train"]
    assert train["tokens_per_s"] > 0 and train["iteration"] == summary["shape"]["train_steps"]
    assert train["tflops_per_gpu_full"] > train["tflops_per_gpu_causal"] > 0
    assert train["mfu_causal"] is None and "no GPU" in train["peak"]  # no peak on a CPU: no MFU, said so
    growth = summary["growth_numerics"]
    assert growth["width_alpha0"]["kl_mean"] < 1e-6  # alpha 0: exact copies (fp32 here)
    assert len(growth["depth_interposition"]["grown_losses"]) == summary["shape"]["growth_after_steps"]
    assert summary["grouped_mm"]["empty_groups"] > 0
    assert summary["matmul_ceiling"]["seconds"] >= 1.0
    assert summary["transformers"]["transformers_class"] == "Qwen3MoeForCausalLM"
    assert summary["comparison"]["grouped_mm_vs_sequential_same_spec"] > 0
    assert "Self CPU" in (out / "profile.txt").read_text()
    table = (out / "summary.md").read_text()
    assert "| train | yes |" in table and "(dry run)" in table
    assert "every phase ran" in (out / "check.log").read_text()


def test_a_phase_past_its_limit_and_a_kill_midway_leave_the_finished_numbers(tmp_path):
    """A phase over its own limit is recorded as timed out and the check goes on; then the whole
    process group is killed in the next phase, as a device call's timeout does: every finished
    phase's numbers are on disk."""
    out = tmp_path / "check"
    proc = subprocess.Popen(["bash", SCRIPT, "--out", str(out), "--dry-run", "--phases",
                             "grouped_mm,matmul_ceiling,growth_numerics", "--phase-limit", "matmul_ceiling=0.5"],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "phases" / "01_matmul_ceiling.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the check ended before its 2nd phase"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grouped_mm"]["ok"] and summary["grouped_mm"]["grouped_ms"] > 0
    assert json.loads((out / "phases" / "00_grouped_mm.json").read_text())["loop_ms"] > 0
    ceiling = summary["matmul_ceiling"]  # it times for >= 1 s: a 0.5 s limit cuts it off
    assert not ceiling["ok"] and "timed out" in ceiling["error"]
    assert "growth_numerics" not in summary  # killed before it ended


def test_dry_run_with_a_bundle_names_what_it_lacks(tmp_path):
    """The bundle's wheels are checked by name for every Python setup.py admits (the image's is
    picked at run time); one missing fails the dry run, named."""
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    for tag in ("cp310", "cp311"):  # no cp312
        for dist in ("megatron_core-0.16.1", "sentencepiece-0.2.1"):
            (bundle / "wheels" / f"{dist}-{tag}-{tag}-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (bundle / "data").mkdir()
    for name in ("tok.model", "corpus.bin", "corpus.idx"):
        (bundle / "data" / name).write_bytes(b"x")
    (bundle / "data" / "data.json").write_text(json.dumps({"tokenizer_model": "tok.model", "prefix": "corpus",
                                                          "vocab_size": 512}))
    proc = _run("--out", str(tmp_path / "check"), "--dry-run", "--bundle", str(bundle), "--phases", "matmul_ceiling")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "no megatron_core wheel for Python 3.12 (cp312)" in proc.stdout
    assert "Python 3.11" not in proc.stdout


def test_the_gpu_tier_asked_for_on_a_cpu_machine_exits_2():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--require-gpu",
                           "tests/functional/test_gpu.py", "-p", "no:cacheprovider"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--require-gpu: this machine has no CUDA GPU" in proc.stdout + proc.stderr
    assert "passed" not in proc.stdout and "skipped" not in proc.stdout


@pytest.mark.parametrize("args,expect", [
    ([], "--out DIR is required"),
    (["--out", "/tmp/x", "--bundle", "/nonexistent/bundle"], "is not a folder"),
    (["--out", "/tmp/x", "--frobnicate"], "unknown argument '--frobnicate'"),
    (["--out", "/tmp/x", "--phase-limit", "train"], "--phase-limit needs PHASE=SECONDS"),
    (["--out", "/tmp/x", "--phases", "train,fly"], "unknown phase(s) fly"),
])
def test_bad_arguments_exit_2_with_one_line(args, expect):
    proc = _run(*args, timeout=120)
    assert proc.returncode == 2
    assert expect in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
