"""Resuming with a recipe that differs from the checkpoint's: applied and logged, or refused; never silent.

Real ``megatron-grow train`` processes (one gloo rank) on the tiny model and a slice of the KJV
corpus. A base run of 3 iterations (warmup 1 + cosine to ``train_iters`` = 3) is saved once; each
case resumes a copy of it.

* ``train_iters`` 3 -> 6 on resume: the cosine is stretched to the new end from the saved step
  (Megatron-LM's ``--override-opt_param-scheduler``); the logged LR of iterations 4-6 is the
  cosine formula over 6 steps written out here. The old code kept the saved 3-step schedule
  (min LR from iteration 3 on) without a word.
* ``lr`` changed on resume (constant schedule): the new LR is used and the change is logged.
* ``model.moe_router_topk`` changed on resume (no tensor changes shape): refused, exit 2, naming
  the field and both values. The old code trained the other model silently.
* ``--grow-from`` with a recipe ``model:`` that disagrees with the source's recorded
  architecture: refused, exit 2, naming the field. The old code used the source's silently.
* ``checkpoint.save`` inside the ``--grow-from`` source: refused, exit 2; the source unchanged.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.distributed.conftest import REPO, write_recipe
from tests.distributed.test_grow_bad_input import tree_digest

MAX_LR, MIN_LR, WARMUP = 3.0e-3, 3.0e-4, 1
GROWTH = {"order": ["depth"], "depth": {"mode": "interposition", "factor": 2}}


def _train(recipe: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "megatron_grow", "train", "--config", recipe, *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def _logged_lrs(stdout: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"\[train\] iter\s+(\d+) \|.*?lr ([0-9.e+-]+)", stdout)}


def cosine_lr(step: int, decay_steps: int) -> float:
    """Warmup from 0, then cosine from MAX_LR to MIN_LR over ``decay_steps`` (Megatron-LM's definition)."""
    if step <= WARMUP:
        return MAX_LR * step / WARMUP
    if step > decay_steps:
        return MIN_LR
    ratio = (step - WARMUP) / (decay_steps - WARMUP)
    return MIN_LR + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (MAX_LR - MIN_LR)


def _recipe(tmp_path, name, dataset, run_dir, **sections):
    training = {"train_iters": 3, "lr": MAX_LR, "min_lr": MIN_LR, "lr_warmup_iters": WARMUP,
                "lr_decay_style": "cosine"}
    training.update(sections.pop("training", {}))
    return write_recipe(tmp_path / name, dataset, run_dir, training=training, **sections)


@pytest.fixture(scope="module")
def base_run(kjv_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_rules")
    run_dir = tmp / "base"
    proc = _train(_recipe(tmp, "base.yaml", kjv_dataset, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lrs = _logged_lrs(proc.stdout)
    for step in (1, 2, 3):  # the base run itself follows the formula (checks the formula too)
        assert lrs[step] == pytest.approx(cosine_lr(step, 3), rel=2e-3), (step, lrs)
    return str(run_dir)


def _copy(base_run, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(base_run, dst)
    return dst


def test_longer_train_iters_extends_the_schedule_and_says_so(base_run, kjv_dataset, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    proc = _train(_recipe(tmp_path, "r.yaml", kjv_dataset, run_dir, training={"train_iters": 6}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train_iters 3 -> 6" in proc.stdout, proc.stdout[-3000:]
    lrs = _logged_lrs(proc.stdout)
    assert sorted(lrs) == [4, 5, 6], lrs
    for step in (4, 5, 6):
        assert lrs[step] == pytest.approx(cosine_lr(step, 6), rel=2e-3), (step, lrs)
    assert lrs[4] > MIN_LR * 1.5  # the saved 3-step schedule would sit at MIN_LR here


def test_changed_lr_is_applied_and_logged(base_run, kjv_dataset, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    proc = _train(_recipe(tmp_path, "r.yaml", kjv_dataset, run_dir,
                          training={"train_iters": 5, "lr": 1.0e-3, "lr_decay_style": "constant"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lr 0.003 -> 0.001" in proc.stdout and "lr_decay_style cosine -> constant" in proc.stdout, proc.stdout
    lrs = _logged_lrs(proc.stdout)
    assert lrs and all(v == pytest.approx(1.0e-3, rel=1e-3) for v in lrs.values()), lrs


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("megatron-grow: error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def test_changed_architecture_on_resume_is_refused(base_run, kjv_dataset, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    before = tree_digest(run_dir)
    proc = _train(_recipe(tmp_path, "r.yaml", kjv_dataset, run_dir, training={"train_iters": 6},
                          model={"vocab_size": 512, "seq_length": 32, "moe_router_topk": 1}))
    line = _one_error_line(proc)
    assert "moe_router_topk: checkpoint 2, recipe 1" in line, line
    assert tree_digest(run_dir) == before


def test_grow_from_with_disagreeing_model_is_refused(base_run, kjv_dataset, tmp_path):
    source_digest = tree_digest(base_run)
    recipe = _recipe(tmp_path, "g.yaml", kjv_dataset, tmp_path / "grown", training={"train_iters": 5},
                     model={"vocab_size": 512, "seq_length": 32, "rotary_base": 500000}, growth=GROWTH)
    line = _one_error_line(_train(recipe, "--grow-from", base_run))
    assert "rotary_base: checkpoint 10000, recipe 500000" in line and base_run in line, line
    assert not os.path.exists(tmp_path / "grown")
    assert tree_digest(base_run) == source_digest


def test_train_save_inside_grow_from_source_is_refused(base_run, kjv_dataset, tmp_path):
    source = _copy(base_run, tmp_path)
    source_digest = tree_digest(source)
    recipe = _recipe(tmp_path, "g.yaml", kjv_dataset, os.path.join(source, "grown"), training={"train_iters": 5},
                     growth=GROWTH)
    line = _one_error_line(_train(recipe, "--grow-from", source))
    assert "is inside the --grow-from source" in line, line
    assert tree_digest(source) == source_digest


def test_read_only_checkpoint_save_is_refused_before_training(kjv_dataset, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("unshare -rm (user + mount namespace) is not available")
    ro = tmp_path / "ro"
    ro.mkdir()
    recipe = _recipe(tmp_path, "r.yaml", kjv_dataset, ro / "run")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} "
                           f"-m megatron_grow train --config {recipe}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    line = _one_error_line(proc)
    assert "checkpoint.save" in line and "not writable" in line, line
    assert "[train] iter" not in proc.stdout, proc.stdout
