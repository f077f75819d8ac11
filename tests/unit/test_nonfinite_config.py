"""Non-finite numbers in a recipe are refused at load, naming the key (issue: lr=.inf trained, then
called a checkpoint of non-finite tensors "the last good checkpoint"; alpha=.nan reported unsourced
tensors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_grow.config.loader import load_recipe
from megatron_grow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override, key", [
    ("training.lr=.inf", "training.lr"),
    ("training.lr=.nan", "training.lr"),
    ("training.min_lr=-.inf", "training.min_lr"),
    ("training.clip_grad=.nan", "training.clip_grad"),
    ("model.init_method_std=.inf", "model.init_method_std"),
    ("growth.width.alpha=.nan", "growth.width.alpha"),
    ("growth.width.alpha=.inf", "growth.width.alpha"),
])
def test_non_finite_number_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_recipe(str(ROOT / "configs/growth/tiny_depth_width.yaml"), [override])
    problems = [p for p in e.value.problems if p.startswith(key)]
    assert problems, e.value.problems
    assert any(word in problems[0] for word in ("finite", "nan", "inf")), problems


def test_nan_lr_on_the_command_line_is_one_error_exit_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "megatron_grow", "train", "--config",
                           str(ROOT / "configs/models/tiny.yaml"), "training.lr=nan"],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "training.lr" in proc.stderr, proc.stderr
