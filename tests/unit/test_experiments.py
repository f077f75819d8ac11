"""The demo's and the reproduction's recipes: every run, whatever its train_iters, is evaluated on
the same validation token ids (built with MCore's datasets from the recipes the experiments write)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

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
    tiny = repro.SIZES["tiny"]
    tiny = dataclasses.replace(tiny, size=dataclasses.replace(tiny.size, vocab_size=512))  # the fixture's tokenizer
    recipes = {}
    for seed in (1234, 1235):  # runs of different seeds too: data.eval_seed fixes the validation order
        steps, meta = repro.build_plan(str(tmp_path / str(seed)), tiny, 2, files, seed=seed)
        assert set(meta) == {s["name"] for s in steps if s["kind"] != "route_stats"}
        first, last = repro.save_iterations(tiny)[::3]
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
    """``repro --size gpu --dry-run``: the GPU plan is defined, its recipes validate, nothing trains, and its
    time under the stated GPU assumptions is within 30 minutes of one GPU."""
    assert main(["repro", "--size", "gpu", "--dry-run", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dry run: 51 steps written" in out and "nothing trained" in out
    rsize = repro.SIZES["gpu"]
    size, tokens = repro.resolved_size(rsize), repro.dataset_tokens(str(next((tmp_path / "data").glob("*.bin")))[:-4])
    passes = size.base_iters * size.global_batch_size * size.seq_length / tokens
    assert passes > repro.MAX_BASE_EPOCHS  # the shipped text is too small for this size: said, not hidden
    assert f"the base reads {passes:.1f} passes over the {tokens:,}-token corpus" in out
    assert "warning: more than 4 passes" in out
    saves = repro.save_iterations(rsize)
    for seed in rsize.seeds:
        recipes = sorted(p.name for p in (tmp_path / f"seed_{seed}" / "recipes").iterdir())
        assert len(recipes) == 16 and f"stack_at_{saves[0]}.yaml" in recipes and "upcycle_utility.yaml" in recipes
        base = load_recipe(str(tmp_path / f"seed_{seed}" / "recipes" / "base.yaml"))
        assert base.training.train_iters == saves[-1] and base.training.seed == seed and base.training.bf16
        assert base.data.eval_seed == repro.EVAL_SEED and base.model.vocab_size == 1024
    assert not any((tmp_path / f"seed_{s}" / "runs").exists() for s in rsize.seeds)
    files = {"prefix": "/nonexistent/corpus", "tokenizer_model": "/nonexistent/tok.model"}
    plans = repro.plan_all(str(tmp_path / "again"), rsize, 1, files, rsize.seeds)
    a = repro.GPU_ASSUMPTIONS  # the estimate's definition, written out: per step overhead + FLOPs at mfu x peak
    seconds = a["downstream_s"] * sum(s["downstream"] for p in plans for s in p.steps)
    for p in plans:
        for m in p.meta.values():
            steps = m["recipe"]["training"]["train_iters"] - (m["from_iteration"] or 0)
            per_step = training_flops_per_step(m["model"], rsize.size.global_batch_size, rsize.size.seq_length)
            seconds += steps * (a["step_overhead_s"] + per_step / (a["mfu"] * a["peak_flops"]))
    assert repro.estimated_gpu_seconds(rsize, plans)["seconds"] == pytest.approx(seconds) and seconds <= 30 * 60


@pytest.mark.parametrize("args,message", [
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--ranks", "0"], "--ranks must be >= 1"),
    (["--seeds", "7", "7"], "--seeds has repeats"),
    (["--report-only"], "study.json does not exist"),
])
def test_repro_bad_flags_are_one_line_exit_2(args, message, tmp_path, capsys):
    assert main(["repro", "--tiny", "--workdir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cpu_plan_controls_and_comparisons(tmp_path):
    """``--size cpu``: every run of the study, the continued base's budget, top-k per arm, and the upcycle
    reading the route statistics an earlier step writes."""
    files = {"prefix": "/nonexistent/corpus", "tokenizer_model": "/nonexistent/tok.model"}
    rsize = repro.SIZES["cpu"]
    steps, meta = repro.build_plan(str(tmp_path), rsize, 1, files, seed=1234)
    saves = repro.save_iterations(rsize)
    names = [s["name"] for s in steps]
    assert names.index(f"route_stats_{saves[-1]}") < names.index("upcycle_utility")
    upcycle = next(s for s in steps if s["name"] == "upcycle_utility")
    stats = next(s for s in steps if s["name"] == f"route_stats_{saves[-1]}")
    assert meta["upcycle_utility"]["growth"]["upcycle"]["utility_stats"] == stats["out"]
    with open(upcycle["recipe"]) as f:
        assert yaml.safe_load(f)["growth"]["upcycle"]["utility_stats"] == stats["out"]
    # The continued base spends at least what the depth-grown run spends after growth, within one evaluation.
    size = rsize.size
    grown = training_flops_per_step(meta[f"interposition_at_{saves[-1]}"]["model"], size.global_batch_size,
                                    size.seq_length) * size.grown_iters
    per_base_step = training_flops_per_step(meta["base"]["model"], size.global_batch_size, size.seq_length)
    iters = meta["continue_base"]["recipe"]["training"]["train_iters"] - saves[-1]
    assert grown <= iters * per_base_step < grown + size.eval_interval * per_base_step
    assert meta["base"]["model"].moe_router_topk == 2 and meta["width_alpha_0"]["model"].moe_router_topk == 4
    assert meta["width_topk_fixed"]["model"].moe_router_topk == 2 == meta["upcycle_utility"]["model"].moe_router_topk
    p = count_params(meta["base"]["model"])
    assert p.expert > 0.5 * p.total  # the routed experts carry most of the parameters
