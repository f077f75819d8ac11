"""The operator seam: the registry matches the recipe's operator sections, maps compose as defined,
and the plan is the ordered list of the recipe's operators."""

import typing

import pytest

from megatron_grow.config.schema import DepthGrowthConfig, GrowthConfig, ModelConfig, WidthGrowthConfig
from megatron_grow.errors import ConfigError
from megatron_grow.growth import operators
from megatron_grow.growth.mapping import IndexMap, compose
from megatron_grow.growth.plan import make_growth_plan

SRC = ModelConfig(num_layers=4, num_moe_experts=4, moe_router_topk=2)


def test_every_operator_section_has_a_registered_operator_of_its_type():
    hints = typing.get_type_hints(GrowthConfig)
    assert set(operators.REGISTRY) == set(GrowthConfig.operator_names())
    for name, cls in operators.REGISTRY.items():
        assert cls.name == name
        assert cls.config_type in typing.get_args(hints[name]), (name, hints[name])


def test_compose_reads_back_from_the_last_operator():
    # first: 2 -> 4 entries, each input twice in place; then: 4 entries reversed.
    first = IndexMap(source=(0, 0, 1, 1), copy_index=(0, 1, 0, 1))
    then = IndexMap(source=(3, 2, 1, 0), copy_index=(0, 0, 0, 0))
    c = compose([first, then], 4)
    # by definition: final j reads first.source[then.source[j]]; its copy index is first's there.
    assert c.source == (1, 1, 0, 0)
    assert c.copy_index == (1, 0, 1, 0)
    assert c.after == ((3, 2, 1, 0), (0, 1, 2, 3))
    # the other way round: the copies are made last, and stay copies through the earlier reversal.
    c = compose([IndexMap((1, 0), (0, 0)), first], 4)
    assert c.source == (1, 1, 0, 0)
    assert c.copy_index == (0, 1, 0, 1)
    assert c.after == ((0, 0, 1, 1), (0, 1, 2, 3))


def test_plan_holds_the_operators_in_the_recipes_order():
    growth = GrowthConfig(order=("width", "depth"), depth=DepthGrowthConfig(), width=WidthGrowthConfig())
    plan = make_growth_plan(SRC, growth)
    assert [op.name for op in plan.operators] == ["width", "depth"] == list(plan.order)
    assert [op.config for op in plan.operators] == [growth.width, growth.depth]


def test_a_section_without_a_registered_operator_is_named(monkeypatch):
    monkeypatch.delitem(operators.REGISTRY, "width")
    with pytest.raises(ConfigError) as err:
        make_growth_plan(SRC, GrowthConfig(width=WidthGrowthConfig()))
    assert err.value.problems[0].startswith("growth.width: no growth operator is registered"), err.value.problems
