"""Depth by insertion (``growth.insert``, LLaMA Pro): the index map and the zeroed tensors against the
definition in docs/growth.md, and the recipe section's bounds and one-line errors."""

from __future__ import annotations

import pytest

from megatron_grow.config.growth_rules import growth_problems
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import DepthGrowthConfig, GrowthConfig, InsertGrowthConfig, ModelConfig
from megatron_grow.errors import ConfigError
from megatron_grow.growth.plan import make_growth_plan

PROJ = "decoder.layers.0.self_attention.linear_proj.weight"
ZEROED = (PROJ, "decoder.layers.0.mlp.experts.experts.linear_fc2.weight", "mlp.shared_experts.linear_fc2.weight",
          "experts.linear_fc2")
KEPT = ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.mlp.experts.experts.linear_fc1.weight",
        "decoder.layers.0.mlp.router.weight", "decoder.layers.0.pre_mlp_layernorm.weight")


def _definition(L: int, after: list[int]) -> tuple[list[int], list[bool]]:
    """docs/growth.md: walk the source layers in order; after layer p emit one copy of p per time p is listed."""
    src, new = [], []
    for p in range(L):
        src.append(p)
        new.append(False)
        for _ in range(after.count(p)):
            src.append(p)
            new.append(True)
    return src, new


@pytest.mark.parametrize("L,section,after", [
    (4, dict(every=2), [1, 3]),                 # LLaMA Pro: one block after each group of 2
    (6, dict(every=4), [3]),                    # 6 -> 7, not a multiple
    (5, dict(every=1), [0, 1, 2, 3, 4]),
    (4, dict(after=(2, 0, 2)), [0, 2, 2]),      # explicit, unsorted, a layer twice
])
def test_map_and_zeroes_match_the_definition(L, section, after):
    plan = make_growth_plan(ModelConfig(num_layers=L), GrowthConfig(insert=InsertGrowthConfig(**section)))
    src, new = _definition(L, after)
    assert plan.target.num_layers == L + len(after)
    assert list(plan.layer_source) == src
    for j, is_new in enumerate(new):
        assert all(plan.operators[0].zeroes(plan, j, k) == is_new for k in ZEROED), j
        assert not any(plan.operators[0].zeroes(plan, j, k) for k in KEPT), j


def test_after_depth_only_the_inserted_blocks_are_zeroed():
    # depth x2 (no identity_init) gives [0,0,1,1,2,2,3,3]; insert after its layers 0 and 2 (both copies
    # of source layers 0 and 1): targets 1 and 4 are the new blocks, the depth copies are kept.
    growth = GrowthConfig(order=("depth", "insert"), depth=DepthGrowthConfig(factor=2),
                          insert=InsertGrowthConfig(after=(0, 2)))
    plan = make_growth_plan(ModelConfig(num_layers=4), growth)
    assert list(plan.layer_source) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    zeroed = [j for j in range(10) if any(op.zeroes(plan, j, PROJ) for op in plan.operators)]
    assert zeroed == [1, 4]


@pytest.mark.parametrize("section,key", [
    (dict(), "growth.insert: set exactly one of growth.insert.every and growth.insert.after"),
    (dict(every=2, after=(1,)), "growth.insert: set exactly one"),
    (dict(after=(4,)), "growth.insert.after: [4] are not source layer indices in [0, 4)"),
    (dict(after=(-1,)), "growth.insert.after: [-1]"),
    (dict(every=5), "growth.insert.every (5) must be <= the source model's num_layers (4)"),
])
def test_problems_name_the_key(section, key):
    problems = growth_problems(GrowthConfig(insert=InsertGrowthConfig(**section)), ModelConfig(num_layers=4))
    assert len(problems) == 1 and problems[0].startswith(key), problems


def test_recipe_bounds_are_one_line_errors():
    with pytest.raises(ConfigError) as err:
        load_recipe(raw={"growth": {"insert": {"every": 0}}})
    assert "growth.insert.every: 0 is not allowed; must be >= 1" in str(err.value)
    r = load_recipe(raw={"model": {"num_layers": 4}, "growth": {"insert": {"after": [1, 3]}}})
    assert r.growth.insert.after == (1, 3)
