"""Recipe loading: strict keys, types and ranges, includes, overrides, all errors at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_grow.config.loader import load_recipe
from megatron_grow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems_of(path=None, overrides=(), raw=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides, raw=raw)
    return info.value.problems


def test_unknown_key_names_it_and_suggests_nearest():
    (problem,) = problems_of(raw={"model": {"num_layer": 4}})
    assert problem.startswith("model.num_layer: unknown key")
    assert "did you mean 'num_layers'?" in problem


def test_unknown_section_suggests_nearest():
    (problem,) = problems_of(raw={"modle": {}})
    assert "modle" in problem and "did you mean 'model'?" in problem


def test_wrong_type():
    (problem,) = problems_of(raw={"model": {"hidden_size": "big"}})
    assert "model.hidden_size" in problem and "expected int" in problem and "'big'" in problem
    (problem,) = problems_of(raw={"model": {"qk_layernorm": 1}})
    assert "model.qk_layernorm" in problem and "expected bool" in problem


def test_out_of_range_and_choices():
    (problem,) = problems_of(raw={"model": {"num_layers": 0}})
    assert "model.num_layers" in problem and ">= 1" in problem
    (problem,) = problems_of(raw={"model": {"normalization": "BatchNorm"}})
    assert "model.normalization" in problem and "'RMSNorm'" in problem


def test_several_errors_reported_at_once():
    probs = problems_of(raw={"model": {"num_layers": 0, "hidden_sise": 8}, "training": {"lr": "fast"}})
    assert len(probs) == 3
    assert {p.split(":")[0] for p in probs} == {"model.num_layers", "model.hidden_sise", "training.lr"}
    try:
        load_recipe(raw={"model": {"num_layers": 0, "hidden_sise": 8}, "training": {"lr": "fast"}})
    except ConfigError as e:
        assert str(e).count("\n  - ") == 3


def test_cross_section_rules():
    probs = problems_of(raw={"training": {"lr": 1e-4, "min_lr": 1e-3},
                             "parallel": {"expert_model_parallel_size": 3}})
    assert any("training.min_lr" in p for p in probs)
    assert any("parallel.expert_model_parallel_size (3) must divide model.num_moe_experts" in p for p in probs)


def test_include_and_merge(tmp_path):
    write(tmp_path, "base.yaml", "model:\n  num_layers: 4\n  hidden_size: 128\ntraining:\n  lr: 1.0e-3\n")
    child = write(tmp_path, "child.yaml", "include: base.yaml\nmodel:\n  num_layers: 6\n")
    recipe = load_recipe(child)
    assert recipe.model.num_layers == 6  # the including file wins
    assert recipe.model.hidden_size == 128  # mappings merge key by key
    assert recipe.training.lr == 1e-3


def test_include_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "include: b.yaml\n")
    b = write(tmp_path, "b.yaml", "include: a.yaml\n")
    (problem,) = problems_of(b)
    assert "include cycle" in problem


def test_cli_style_overrides(tmp_path):
    path = write(tmp_path, "r.yaml", "model:\n  num_layers: 4\n")
    recipe = load_recipe(path, ["model.num_layers=8", "model.moe_router_topk_scaling_factor=2.5",
                                "training.recompute_granularity=null"])
    assert recipe.model.num_layers == 8
    assert recipe.model.moe_router_topk_scaling_factor == 2.5
    assert recipe.training.recompute_granularity is None
    (problem,) = problems_of(path, ["model.num_layers=many"])
    assert "model.num_layers" in problem and "expected int" in problem
    (problem,) = problems_of(path, ["model.num_layers"])
    assert "key.sub=value" in problem


@pytest.mark.slow
def test_bad_recipe_via_cli_exits_2_with_one_clear_message(tmp_path):
    path = write(tmp_path, "bad.yaml", "model:\n  num_layres: 4\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}  # errors print on rank 0
    proc = subprocess.run([sys.executable, "-m", "megatron_grow", "plan", "--config", path],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron-grow: error:")]
    assert len(errors) == 1
    assert "model.num_layres: unknown key" in proc.stderr and "did you mean 'num_layers'?" in proc.stderr


def test_missing_recipe_file():
    (problem,) = problems_of("/nonexistent/recipe.yaml")
    assert "not found" in problem
