"""The demo's and the reproduction's recipes: every run, whatever its train_iters, is evaluated on
the same validation token ids (built with MCore's datasets from the recipes the experiments write)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_grow.config.check import built_model, check_recipe
from megatron_grow.config.loader import load_recipe
from megatron_grow.data.datasets import build_datasets
from megatron_grow.errors import ConfigError
from megatron_grow.experiments import demo, repro
from tests.unit.test_datasets import data, validation_ids  # noqa: F401  (the module's data fixture)


def _validation(recipe, tok, eval_samples=...):
    d = recipe.data if eval_samples is ... else dataclasses.replace(recipe.data, eval_samples=eval_samples)
    n = recipe.training.eval_iters * recipe.training.global_batch_size
    return validation_ids(build_datasets(d, built_model(recipe), recipe.training, tok).valid, n)


def _assert_same_validation(recipes: dict, tok) -> None:
    assert len({r.training.train_iters for r in recipes.values()}) > 1  # runs of different lengths
    ids = {name: _validation(r, tok) for name, r in recipes.items()}
    first = next(iter(ids.values()))
    for name, x in ids.items():
        assert torch.equal(x, first), name
    # With Megatron-LM's count (eval_samples null) the same recipes read different tokens.
    old = {name: _validation(r, tok, eval_samples=None) for name, r in recipes.items()}
    assert any(not torch.equal(x, next(iter(old.values()))) for x in old.values())


def test_demo_runs_share_validation_tokens(data, tmp_path):  # noqa: F811
    files = {"prefix": data["a"], "tokenizer_model": data["tok"].model_file}
    paths = demo.build_recipes(str(tmp_path), demo.SIZES["reduced"], 2, files)
    recipes = {name: load_recipe(path) for name, path in paths.items()}
    assert {r.data.eval_samples for r in recipes.values()} == {demo.SIZES["reduced"].eval_samples}
    _assert_same_validation(recipes, data["tok"])


def test_repro_runs_share_validation_tokens(data, tmp_path):  # noqa: F811
    files = {"prefix": data["a"], "tokenizer_model": data["tok"].model_file}
    steps, meta = repro.build_plan(str(tmp_path), repro.SIZES["tiny"], 2, files, seed=1234)
    assert set(meta) == {s["name"] for s in steps}
    first_save = repro.checkpoint_iterations(repro.SIZES["tiny"])[0]
    picked = ("base", "interposition", "scratch_depth", f"interposition_at_{first_save}")
    recipes = {s["name"]: load_recipe(s["recipe"]) for s in steps if s["name"] in picked}
    _assert_same_validation(recipes, data["tok"])


def test_eval_samples_must_cover_one_evaluation():
    raw = {"training": {"eval_iters": 2, "global_batch_size": 16, "micro_batch_size": 8}, "data": {"eval_samples": 16}}
    with pytest.raises(ConfigError, match=r"data\.eval_samples \(16\) must be >= .*\(32\)"):
        load_recipe(raw=raw)
    ok = load_recipe(raw=dict(raw, data={"eval_samples": 32}))
    assert ok.data.eval_samples == 32 and not check_recipe(ok)
