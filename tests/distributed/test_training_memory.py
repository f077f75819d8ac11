"""``plan``'s parameters per GPU agree with Megatron-Core's own model, stage by stage, at full size.

The 35B (its recipe: PP 4 x EP 8, 32 GPUs) and the grown 70B (35b_to_70b.yaml: 192 experts on the
same layout) are built on the meta device as one rank of every pipeline stage under torch's fake
process group (``analysis.training_memory``), plus a tiny model with TP 2 x PP 2 x EP 2 (TP-sharded
attention and embedding, a middle-less pipeline). The dense and routed-expert parameter counts of
each stage must equal ``models.params``' formula exactly (it is what ``plan`` multiplies into bytes).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/distributed/test_training_memory.py
"""

from __future__ import annotations

import dataclasses

import pytest

from megatron_grow.config.check import built_model
from megatron_grow.config.loader import load_recipe
from megatron_grow.parallel.spawn import run_in_processes

pytestmark = pytest.mark.slow  # a fresh process (the fake process group needs one); ~10 s


def stages_of(recipes: list, worlds: list) -> list:
    from megatron_grow.analysis.training_memory import stage_parameters

    return [stage_parameters(r, w) for r, w in zip(recipes, worlds)]


def grown(path: str):
    recipe = load_recipe(path)
    return dataclasses.replace(recipe, model=built_model(recipe), growth=None)


def test_parameters_per_gpu_match_the_formula_at_every_stage():
    recipes = [load_recipe("configs/models/35b.yaml"), grown("configs/growth/35b_to_70b.yaml"),
               load_recipe("configs/models/tiny.yaml", ["parallel.tensor_model_parallel_size=2",
                                                        "parallel.pipeline_model_parallel_size=2",
                                                        "parallel.expert_model_parallel_size=2"])]
    results = run_in_processes(stages_of, 1, (recipes, [32, 32, 8]), timeout=600)[0]
    assert [len(r) for r in results] == [4, 4, 2]
    assert results[1][0]["expert_params"] == 2 * results[0][0]["expert_params"]  # 96 -> 192 experts
    for name, stages in zip(("35b", "70b", "tiny"), results):
        for s in stages:
            assert (s["dense_params"], s["expert_params"]) == (s["formula_dense_params"], s["formula_expert_params"]), \
                f"{name} stage {s['stage']}: {s}"
