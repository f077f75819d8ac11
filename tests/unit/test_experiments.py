"""The demo's and the reproduction's recipes: every run, whatever its train_iters, is evaluated on
the same validation token ids (built with MCore's datasets from the recipes the experiments write)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_grow.__main__ import main
from megatron_grow.config.check import built_model, check_recipe
from megatron_grow.config.loader import load_recipe
from megatron_grow.data.datasets import build_datasets
from megatron_grow.errors import ConfigError
from megatron_grow.experiments import demo, repro
from megatron_grow.models.params import count_params
from megatron_grow.training.flops import training_flops_per_step
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
    recipes = {}
    for seed in (1234, 1235):  # runs of different seeds too: data.eval_seed fixes the validation order
        steps, meta = repro.build_plan(str(tmp_path / str(seed)), repro.SIZES["tiny"], 2, files, seed=seed)
        assert set(meta) == {s["name"] for s in steps if s["kind"] != "route_stats"}
        first, last = repro.save_iterations(repro.SIZES["tiny"])[::3]
        picked = ("base", f"interposition_at_{last}", "scratch_depth", f"stack_at_{first}")
        recipes.update({(seed, s["name"]): load_recipe(s["recipe"]) for s in steps if s["name"] in picked})
    assert len({r.training.seed for r in recipes.values()}) == 2
    _assert_same_validation(recipes, data["tok"])


def test_repro_saves_sit_at_the_chinchilla_multiples():
    """The cpu size's four base saves at about 0.25, 0.5, 1 and 2 F_c, from F_c = 120 N_a^2 and the
    per-step FLOPs of its model (written out here from the recipe, not taken from the plan)."""
    rsize = repro.SIZES["cpu"]
    model = load_recipe(raw={"model": repro.base_model_section(rsize.size)}).model
    f_c = 120.0 * count_params(model).activated ** 2
    per_step = training_flops_per_step(model, rsize.size.global_batch_size, rsize.size.seq_length)
    saves = repro.save_iterations(rsize)
    assert [b // saves[0] for b in saves] == [1, 2, 4, 8] and saves[0] % rsize.size.eval_interval == 0
    for it, target in zip(saves, (0.25, 0.5, 1.0, 2.0)):
        assert it * per_step / f_c == pytest.approx(target, rel=0.1), (it, target)
    assert repro.resolved_size(rsize).base_iters == saves[-1]


def test_eval_samples_must_cover_one_evaluation():
    raw = {"training": {"eval_iters": 2, "global_batch_size": 16, "micro_batch_size": 8}, "data": {"eval_samples": 16}}
    with pytest.raises(ConfigError, match=r"data\.eval_samples \(16\) must be >= .*\(32\)"):
        load_recipe(raw=raw)
    ok = load_recipe(raw=dict(raw, data={"eval_samples": 32}))
    assert ok.data.eval_samples == 32 and not check_recipe(ok)


def test_gpu_size_dry_run_writes_every_recipe(tmp_path, capsys):
    """``repro --size gpu --dry-run``: the GPU plan is defined, its recipes validate, nothing trains."""
    assert main(["repro", "--size", "gpu", "--dry-run", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dry run: 39 recipes written" in out and "nothing trained" in out
    rsize = repro.SIZES["gpu"]
    saves = repro.save_iterations(rsize)
    for seed in rsize.seeds:
        recipes = sorted(p.name for p in (tmp_path / f"seed_{seed}" / "recipes").iterdir())
        assert len(recipes) == 13 and f"stack_at_{saves[0]}.yaml" in recipes and "full.yaml" in recipes
        base = load_recipe(str(tmp_path / f"seed_{seed}" / "recipes" / "base.yaml"))
        assert base.training.train_iters == saves[-1] and base.training.seed == seed and base.training.bf16
        assert base.data.eval_seed == repro.EVAL_SEED and base.model.vocab_size == 4096
    assert not any((tmp_path / f"seed_{s}" / "runs").exists() for s in rsize.seeds)


@pytest.mark.parametrize("args,message", [
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--ranks", "0"], "--ranks must be >= 1"),
    (["--seeds", "7", "7"], "--seeds has repeats"),
    (["--report-only"], "raw_results.json does not exist"),
])
def test_repro_bad_flags_are_one_line_exit_2(args, message, tmp_path, capsys):
    assert main(["repro", "--tiny", "--workdir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cpu4_plans_only_finding_b(tmp_path):
    """``--size cpu4``: a 4-layer base and only the runs finding (b) compares."""
    files = {"prefix": "/nonexistent/corpus", "tokenizer_model": "/nonexistent/tok.model"}
    rsize = repro.SIZES["cpu4"]
    steps, meta = repro.build_plan(str(tmp_path), rsize, 1, files, seed=1234)
    first, last = repro.save_iterations(rsize)[::3]
    assert [s["name"] for s in steps] == ["base", f"interposition_at_{first}", f"stack_at_{first}",
                                          f"interposition_at_{last}", f"stack_at_{last}"]
    assert meta["base"]["model"].num_layers == 4 and meta[f"stack_at_{last}"]["model"].num_layers == 8
    assert not any(s["downstream"] for s in steps)
