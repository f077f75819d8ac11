"""``megatron-grow eval`` end to end: a tiny Qwen3-MoE built with transformers and a sentencepiece
tokenizer trained on the shipped corpus, imported with ``import-hf``, evaluated on the shipped
``kjv_cloze`` task through lm-eval's HF backend. Accuracy is whatever it is; the machinery and
the standard error (from its definition for a mean of 0/1 outcomes) are what is checked."""

from __future__ import annotations

import gzip
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args, cwd=None):
    # A one-process command: no rendezvous variables an earlier in-process test may have left behind
    # (an inherited MASTER_PORT can name a port this pytest process still holds).
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "megatron_grow", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_eval_reports_accuracy_with_stderr(tmp_path):
    from megatron_grow.data.tokenizer import train_tokenizer
    from megatron_grow.interop.hf.tiny import save_tiny_model
    from megatron_grow.interop.hf.tokenizer import sentencepiece_to_hf_dir

    text = tmp_path / "kjv.txt"
    with gzip.open(os.path.join(REPO, "data", "corpus", "kjv.txt.gz"), "rt", encoding="utf-8") as f:
        text.write_text(f.read(200_000), encoding="utf-8")
    train_tokenizer([str(text)], str(tmp_path / "tok"), 512)
    hf_dir = save_tiny_model("Qwen3MoeForCausalLM", str(tmp_path / "hf"), vocab_size=512)
    sentencepiece_to_hf_dir(str(tmp_path / "tok.model"), hf_dir)
    imported = _cli("import-hf", "--hf-dir", hf_dir, "--save", str(tmp_path / "ckpt"), "--quiet")
    assert imported.returncode == 0, imported.stderr[-2000:]

    n = 24
    run = _cli("eval", "--load", str(tmp_path / "ckpt"), "--tasks", "kjv_cloze", "--limit", str(n), "--quiet",
               cwd=str(tmp_path))  # not the repo root: the shipped task must not depend on the cwd
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)), int(m.group(4))) for m in re.finditer(
        r"^\s+kjv_cloze\s+(acc|acc_norm)\s+([0-9.]+)\s+([0-9.]+)\s+(\d+)$", run.stdout, re.M)}
    assert set(rows) == {"acc", "acc_norm"}, run.stdout
    for acc, stderr, samples in rows.values():
        assert samples == n and 0.0 <= acc <= 1.0
        assert abs(acc * n - round(acc * n)) < 1e-3  # a fraction of n answers
        assert math.isclose(stderr, math.sqrt(acc * (1 - acc) / (n - 1)), abs_tol=1e-4)


def test_eval_bad_input_is_one_line_exit_2(tmp_path):
    missing = _cli("eval", "--load", str(tmp_path / "missing"), "--tasks", "kjv_cloze")
    errors = [line for line in missing.stderr.splitlines() if line.startswith("megatron-grow: error")]
    assert missing.returncode == 2 and len(errors) == 1 and "does not exist" in errors[0], missing.stderr[-2000:]
    unknown = _cli("eval", "--load", str(tmp_path / "missing"), "--tasks", "no_such_task_xyz")
    errors = [line for line in unknown.stderr.splitlines() if line.startswith("megatron-grow: error")]
    assert unknown.returncode == 2 and len(errors) == 1 and "unknown lm-eval task" in errors[0], \
        unknown.stderr[-2000:]
