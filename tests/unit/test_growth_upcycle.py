"""Expert upcycling (``growth.upcycle``): the allocation rule and the index map against hand-worked
values from their definition in docs/growth.md, the section's problems, and the statistics file read
into the plan (and so into the growth record)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_grow.config.loader import load_recipe
from megatron_grow.config.route_stats import FORMAT, file_sha256
from megatron_grow.config.schema import (
    DepthGrowthConfig,
    GrowthConfig,
    InsertGrowthConfig,
    ModelConfig,
    UpcycleGrowthConfig,
)
from megatron_grow.errors import ConfigError
from megatron_grow.growth import optimizer_state, retarget, verify
from megatron_grow.growth.operators.upcycle import UpcycleOperator, allocate_copies, upcycle_map
from megatron_grow.growth.plan import make_growth_plan

SRC = ModelConfig(num_layers=2, num_moe_experts=4, moe_router_topk=2, moe_router_enable_expert_bias=True)


# Worked by hand: quota q_e = n*u_e/sum(u); floor; the rest to the largest q_e - floor(q_e), lower index first.
@pytest.mark.parametrize("utility, n, expected", [
    ((0.5, 0.3, 0.2, 0.0), 3, (1, 1, 1, 0)),      # q = 1.5, .9, .6, 0 -> floors 1,0,0,0; +1 to e1 (.9), e2 (.6)
    ((0.4, 0.4, 0.2), 4, (2, 1, 1)),              # q = 1.6, 1.6, .8 -> 1,1,0; +1 to e2 (.8), then e0 (tie with e1)
    ((1.0,) * 8, 3, (1, 1, 1, 0, 0, 0, 0, 0)),     # uniform: the remainder to the lowest indices
    ((0.0, 0.0, 0.0), 4, (2, 1, 1)),              # all zero counts as uniform: q = 4/3 each
    ((0.7, 0.1, 0.1, 0.1), 6, (4, 1, 1, 0)),      # q = 4.2, .6, .6, .6 -> 4,0,0,0; +1 to e1, e2 (.6 > .2; by index)
    ((3.0, 1.0), 0, (0, 0)),
])
def test_largest_remainder_allocation(utility, n, expected):
    assert allocate_copies(utility, n) == expected
    assert sum(allocate_copies(utility, n)) == n


def test_allocation_refuses_negative_utility():
    with pytest.raises(ValueError):
        allocate_copies((1.0, -0.1), 2)


def test_upcycle_maps():
    m = upcycle_map((2, 1, 0), "append")
    assert (m.source, m.copy_index) == ((0, 1, 2, 0, 0, 1), (0, 0, 0, 1, 2, 1))
    m = upcycle_map((2, 1, 0), "interleave")
    assert (m.source, m.copy_index) == ((0, 0, 0, 1, 1, 2), (0, 1, 2, 0, 1, 0))


def _growth(**kw):
    return GrowthConfig(upcycle=UpcycleGrowthConfig(**kw))


def test_plan_keeps_topk_and_follows_the_utility():
    plan = make_growth_plan(SRC, _growth(num_experts=7, utility_shares=(0.1, 0.6, 0.2, 0.1)))
    # q = 3 * (.1, .6, .2, .1) = .3, 1.8, .6, .3 -> floors 0,1,0,0; +1 to e1 (.8), e2 (.6)
    assert plan.target.num_moe_experts == 7 and plan.target.moe_router_topk == 2
    # one row of shares stands for every layer
    assert plan.expert_source == ((0, 1, 2, 3, 1, 1, 2),) * 2
    assert plan.expert_copy_index == ((0, 0, 0, 0, 1, 2, 1),) * 2


def test_uniform_ignores_shares():
    plan = make_growth_plan(SRC, _growth(num_experts=6, allocation="uniform"))
    assert plan.expert_source == ((0, 1, 2, 3, 0, 1),) * 2


# Layer 0: q = 3 * (.1, .6, .2, .1) = .3, 1.8, .6, .3 -> floors 0,1,0,0; +1 to e1 (.8), e2 (.6): copies 0,2,1,0.
# Layer 1: q = 3 * (.3, .4, .2, .1) = .9, 1.2, .6, .3 -> floors 0,1,0,0; +1 to e0 (.9), e2 (.6): copies 1,1,1,0.
# (Averaged over the layers, u = .2, .5, .2, .1 would give copies 1,1,1,0 in both layers.)
PER_LAYER = ((0.1, 0.6, 0.2, 0.1), (0.3, 0.4, 0.2, 0.1))
PER_LAYER_SOURCE = ((0, 1, 2, 3, 1, 1, 2), (0, 1, 2, 3, 0, 1, 2))
PER_LAYER_COPY = ((0, 0, 0, 0, 1, 2, 1), (0, 0, 0, 0, 1, 1, 1))


def test_each_layer_is_allocated_by_its_own_shares():
    plan = make_growth_plan(SRC, _growth(num_experts=7, utility_shares=PER_LAYER))
    assert plan.expert_source == PER_LAYER_SOURCE
    assert plan.expert_copy_index == PER_LAYER_COPY


def test_each_layer_is_allocated_by_its_own_shares_interleaved():
    plan = make_growth_plan(SRC, _growth(num_experts=7, utility_shares=PER_LAYER, expert_layout="interleave"))
    # layer 0 copies 0,2,1,0: e0, e1 e1' e1'', e2 e2', e3; layer 1 copies 1,1,1,0: e0 e0', e1 e1', e2 e2', e3
    assert plan.expert_source == ((0, 1, 1, 1, 2, 2, 3), (0, 0, 1, 1, 2, 2, 3))
    assert plan.expert_copy_index == ((0, 0, 1, 2, 0, 1, 0), (0, 1, 0, 1, 0, 1, 0))


def test_depth_before_or_after_carries_each_layer_its_map():
    # stack x2: target layers 0..3 read source layers 0, 1, 0, 1 (both orders), each with its source layer's map.
    depth = dict(factor=2, mode="stack")
    for order in (("depth", "upcycle"), ("upcycle", "depth")):
        growth = GrowthConfig(order=order, depth=DepthGrowthConfig(**depth),
                              upcycle=UpcycleGrowthConfig(num_experts=7, utility_shares=PER_LAYER))
        plan = make_growth_plan(SRC, growth)
        assert plan.layer_source == (0, 1, 0, 1), order
        assert plan.expert_source == PER_LAYER_SOURCE * 2, order
        assert plan.expert_copy_index == PER_LAYER_COPY * 2, order


def test_insert_before_upcycle_gives_the_new_block_its_source_layers_map():
    # insert after layer 0: target layers 0, 1 (new, reads 0), 2 (reads 1)
    growth = GrowthConfig(order=("insert", "upcycle"), insert=InsertGrowthConfig(after=(0,)),
                          upcycle=UpcycleGrowthConfig(num_experts=7, utility_shares=PER_LAYER))
    plan = make_growth_plan(SRC, growth)
    assert plan.layer_source == (0, 0, 1)
    assert plan.expert_source == (PER_LAYER_SOURCE[0], PER_LAYER_SOURCE[0], PER_LAYER_SOURCE[1])


def test_layer_rows_must_match_the_source_layers():
    with pytest.raises(ConfigError) as err:
        make_growth_plan(SRC, _growth(num_experts=7, utility_shares=PER_LAYER * 2))
    assert "growth.upcycle.utility_shares: 4 layer rows for the source's 2 layers" in str(err.value)


@pytest.mark.parametrize("kw, needle", [
    (dict(num_experts=4, allocation="uniform"), "growth.upcycle.num_experts (4) must be > the experts it grows (4)"),
    (dict(num_experts=6), "growth.upcycle.utility_stats: required by allocation: utility"),
    (dict(num_experts=6, utility_shares=(1.0, 2.0)), "growth.upcycle.utility_shares: 2 values for 4 experts"),
    (dict(num_experts=6, utility_shares=(1.0, -2.0, 0, 0)), "growth.upcycle.utility_shares: every value"),
    (dict(num_experts=6, allocation="uniform", bias_noise=-1.0), "growth.upcycle.bias_noise"),
])
def test_problems_name_the_key(kw, needle):
    with pytest.raises(ConfigError) as err:
        make_growth_plan(SRC, _growth(**kw))
    assert needle in str(err.value)


def test_bias_noise_needs_an_expert_bias():
    model = dataclasses.replace(SRC, moe_router_enable_expert_bias=False)
    with pytest.raises(ConfigError) as err:
        make_growth_plan(model, _growth(num_experts=6, allocation="uniform", bias_noise=0.1))
    assert "growth.upcycle.bias_noise (0.1) needs model.moe_router_enable_expert_bias: true" in str(err.value)


def _stats_file(tmp_path, shares):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"format": FORMAT, "shares": shares}))
    return str(path)


def test_stats_file_is_read_into_the_plan(tmp_path):
    # each layer by its own row (PER_LAYER's hand-worked allocation)
    path = _stats_file(tmp_path, [list(row) for row in PER_LAYER])
    recipe = load_recipe(raw={"model": dataclasses.asdict(SRC),
                              "growth": {"upcycle": {"num_experts": 7, "utility_stats": path}}})
    plan = make_growth_plan(recipe.model, recipe.growth)
    section = plan.growth.upcycle
    assert section.utility_shares == PER_LAYER
    assert section.utility_stats_sha256 == file_sha256(path)
    assert plan.expert_source == PER_LAYER_SOURCE
    # the record's section (dataclasses.asdict) rebuilds the same plan without the file
    rebuilt = UpcycleGrowthConfig(**json.loads(json.dumps(dataclasses.asdict(section))))
    (tmp_path / "stats.json").unlink()
    assert make_growth_plan(SRC, GrowthConfig(upcycle=rebuilt)).expert_source == plan.expert_source
    assert "sha256" in UpcycleOperator.describe(dataclasses.asdict(section))


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"), ("{", "not a readable JSON"), ('{"shares": [[1, 2]]}', "is not a megatron_grow"),
])
def test_bad_stats_file_is_one_line_naming_the_key(tmp_path, content, needle):
    path = tmp_path / "stats.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        make_growth_plan(SRC, _growth(num_experts=6, utility_stats=str(path)))
    assert "growth.upcycle.utility_stats:" in str(err.value) and needle in str(err.value)


def test_bias_noise_only_on_copies():
    plan = make_growth_plan(SRC, _growth(num_experts=6, allocation="uniform", bias_noise=0.5))
    source = torch.tensor([0.1, 0.2, 0.3, 0.4])
    grown = plan.operators[0].expert_bias(plan, 1, source[list(plan.expert_source[1])].clone(), source)
    assert torch.equal(grown[:4], source)
    assert not torch.equal(grown[4:], source[:2])


def test_unselected_copies_need_sigmoid_routing_with_expert_bias():
    model = dataclasses.replace(SRC, moe_router_score_function="softmax")
    with pytest.raises(ConfigError) as err:
        make_growth_plan(model, _growth(num_experts=6, allocation="uniform", unselected_copies=True))
    assert "growth.upcycle.unselected_copies needs model.moe_router_score_function: sigmoid" in str(err.value)


def test_unselected_copies_sit_below_every_original():
    plan = make_growth_plan(SRC, _growth(num_experts=6, allocation="uniform", bias_noise=0.5,
                                         unselected_copies=True))
    source = torch.tensor([0.1, -0.2, 0.3, 0.4])
    grown = plan.operators[0].expert_bias(plan, 0, source[list(plan.expert_source[0])].clone(), source)
    assert torch.equal(grown[:4], source) and (grown[4:] <= -2.2).all()


def test_verify_projects_each_layer_through_its_own_map():
    # PER_LAYER append: target expert 4 copies source expert 1 in layer 0 and source expert 0 in layer 1.
    # All of each layer's tokens on target 4 -> by source expert: layer 0 all on e1, layer 1 all on e0.
    plan = make_growth_plan(SRC, _growth(num_experts=7, utility_shares=PER_LAYER))
    loads = torch.zeros(2, 7, dtype=torch.float64)
    loads[:, 4] = 10
    src_loads = torch.ones(2, 4, dtype=torch.float64)
    change = verify._routing_change(src_loads, loads, {}, {}, plan)
    assert change["routing_share_by_source_expert_after"] == [0.5, 0.5, 0.0, 0.0]
    assert change["routing_share_by_source_expert_before"] == [0.25] * 4
    assert change["routing_mass_moved"] == pytest.approx(0.75)  # per layer 0.5 * (0.75 + 3 * 0.25)
    metrics = verify._routing_metrics(loads, plan)
    assert metrics["routing_share_copies"] == 1.0 and metrics["per_layer_share_original"] == [0.0, 0.0]


@pytest.mark.parametrize("layer", [0, 1])
def test_carried_router_moments_follow_each_layers_map(layer):
    # carry: a router moment's rows are read through the layer's own map (PER_LAYER_SOURCE[layer]);
    # carry_zero_new: the copies' rows (targets 4..6 in every layer, append) start at 0.
    plan = make_growth_plan(SRC, _growth(num_experts=7, utility_shares=PER_LAYER))
    moment = torch.arange(4, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row e holds e
    task = retarget.SliceTask(None, retarget.ROUTER, (), target_layer=layer, source_layer=layer)
    carried = optimizer_state.grown_moment(task, moment, plan, zero_new=False)
    assert carried[:, 0].tolist() == [float(e) for e in PER_LAYER_SOURCE[layer]]
    zeroed = optimizer_state.grown_moment(task, moment, plan, zero_new=True)
    assert zeroed[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0]
