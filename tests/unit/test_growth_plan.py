"""GrowthPlan composition and validation: target counts, noise keying, and errors naming keys."""

import dataclasses
import glob
import os

import pytest

from megatron_grow.config.growth_rules import growth_problems
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import DepthGrowthConfig, GrowthConfig, ModelConfig, WidthGrowthConfig
from megatron_grow.errors import ConfigError
from megatron_grow.growth.plan import make_growth_plan

SRC = ModelConfig(num_layers=4, num_moe_experts=4, moe_router_topk=2)


def grow(**kw):
    return GrowthConfig(**kw)


def test_depth_only_counts():
    p = make_growth_plan(SRC, grow(depth=DepthGrowthConfig(factor=2)))
    assert (p.target.num_layers, p.target.num_moe_experts, p.target.moe_router_topk) == (8, 4, 2)
    assert p.layer_source == (0, 0, 1, 1, 2, 2, 3, 3)
    assert p.expert_source == ((0, 1, 2, 3),) * 8 and p.expert_copy_index == ((0, 0, 0, 0),) * 8
    assert p.counts()["num_layers"] == (4, 8)
    # the rest of the model config is carried over unchanged
    assert p.target.hidden_size == SRC.hidden_size and p.source is SRC


def test_width_only_counts():
    p = make_growth_plan(SRC, grow(width=WidthGrowthConfig(factor=2)))
    assert (p.target.num_layers, p.target.num_moe_experts, p.target.moe_router_topk) == (4, 8, 4)
    assert p.expert_source == ((0, 1, 2, 3, 0, 1, 2, 3),) * 4  # the same map in every layer
    assert p.expert_copy_index == ((0, 0, 0, 0, 1, 1, 1, 1),) * 4
    assert p.layer_is_new_copy == (False,) * 4
    assert p.counts()["experts_total"] == (16, 32)


def test_topk_factor_one_is_experts_only():
    p = make_growth_plan(SRC, grow(width=WidthGrowthConfig(factor=2, topk_factor=1)))
    assert (p.target.num_moe_experts, p.target.moe_router_topk) == (8, 2)


def test_paper_17b_35b_70b():
    m17 = ModelConfig(num_layers=28, hidden_size=2048, num_moe_experts=96, moe_router_topk=6,
                      moe_ffn_hidden_size=1024)
    p = make_growth_plan(m17, grow(order=("depth", "width"), depth=DepthGrowthConfig(),
                                   width=WidthGrowthConfig()))
    assert (p.target.num_layers, p.target.num_moe_experts, p.target.moe_router_topk) == (56, 192, 12)


def test_noise_layer_depends_on_order():
    d, w = DepthGrowthConfig(factor=2), WidthGrowthConfig(factor=2)
    depth_first = make_growth_plan(SRC, grow(order=("depth", "width"), depth=d, width=w))
    width_first = make_growth_plan(SRC, grow(order=("width", "depth"), depth=d, width=w))
    assert depth_first.layer_source == width_first.layer_source
    assert [depth_first.layer_index_after("width", j) for j in range(8)] == list(range(8))
    assert [width_first.layer_index_after("width", j) for j in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    # empty order means depth then width
    assert make_growth_plan(SRC, grow(depth=d, width=w)).order == ("depth", "width")


def assert_problem(growth, key, model=SRC):
    with pytest.raises(ConfigError) as err:
        make_growth_plan(model, growth)
    assert any(p.startswith(key) for p in err.value.problems), err.value.problems
    assert any(p.startswith(key) for p in growth_problems(growth, model))


@pytest.mark.parametrize("factor", [1, 0, -2])
def test_depth_factor_below_two(factor):
    assert_problem(grow(depth=DepthGrowthConfig(factor=factor)), "growth.depth.factor")


@pytest.mark.parametrize("factor", [1, 0])
def test_width_factor_below_two(factor):
    assert_problem(grow(width=WidthGrowthConfig(factor=factor)), "growth.width.factor")


def test_negative_alpha():
    assert_problem(grow(width=WidthGrowthConfig(alpha=-0.01)), "growth.width.alpha")


def test_unknown_noise_mode():
    assert_problem(grow(width=WidthGrowthConfig(noise="uniform")), "growth.width.noise")


def test_unknown_depth_mode_and_layout():
    assert_problem(grow(depth=DepthGrowthConfig(mode="sandwich")), "growth.depth.mode")
    assert_problem(grow(width=WidthGrowthConfig(expert_layout="shuffle")), "growth.width.expert_layout")


@pytest.mark.parametrize("first,last", [(2, 2), (4, 0), (3, 2)])
def test_ignores_cover_all_layers(first, last):
    assert_problem(grow(depth=DepthGrowthConfig(ignore_first=first, ignore_last=last)),
                   "growth.depth.ignore_first + growth.depth.ignore_last")


def test_ignores_just_below_limit_ok():
    p = make_growth_plan(SRC, grow(depth=DepthGrowthConfig(ignore_first=2, ignore_last=1)))
    assert p.target.num_layers == 5


@pytest.mark.parametrize("order,depth,width", [
    (("depth",), DepthGrowthConfig(), WidthGrowthConfig()),    # width section not in order
    (("depth", "width"), DepthGrowthConfig(), None),          # width in order, section null
    (("depth", "depth"), DepthGrowthConfig(), None),          # repeated
    (("height",), DepthGrowthConfig(), None),                 # unknown operator
])
def test_order_mismatch(order, depth, width):
    assert_problem(grow(order=order, depth=depth, width=width), "growth.order")


def test_no_operator():
    assert_problem(grow(), "growth:")


def test_topk_exceeding_experts():
    assert_problem(grow(width=WidthGrowthConfig(factor=2, topk_factor=5)), "growth.width.topk_factor")


def test_all_problems_reported_together():
    g = grow(order=("width",), depth=DepthGrowthConfig(factor=1), width=WidthGrowthConfig(alpha=-1.0))
    keys = {p.split(":")[0] for p in growth_problems(g, SRC)}
    assert {"growth.depth.factor", "growth.width.alpha", "growth.order"} <= keys


def test_recipe_growth_section_loads():
    r = load_recipe(raw={"model": {"num_layers": 4},
                         "growth": {"order": ["width", "depth"], "depth": {"mode": "stack"},
                                    "width": {"noise": "antithetic", "topk_factor": 1}}})
    assert r.growth.order == ("width", "depth")
    assert r.growth.depth.mode == "stack" and r.growth.width.noise == "antithetic"
    p = make_growth_plan(r.model, r.growth)
    assert p.target.num_layers == 8 and p.target.moe_router_topk == r.model.moe_router_topk
    assert load_recipe(raw={}).growth is None


def test_recipe_growth_bad_value_is_config_error():
    with pytest.raises(ConfigError) as err:
        load_recipe(raw={"growth": {"depth": {"factor": 1}}})
    assert "growth" in str(err.value)


def test_plan_is_frozen():
    p = make_growth_plan(SRC, grow(depth=DepthGrowthConfig()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.layer_source = ()


CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "growth")
GROWTH_YAMLS = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))


def test_growth_yamls_exist():
    names = {os.path.basename(p) for p in GROWTH_YAMLS}
    assert {"17b_to_35b.yaml", "35b_to_70b.yaml", "tiny_depth.yaml", "tiny_width.yaml",
            "tiny_depth_width.yaml"} <= names


@pytest.mark.parametrize("path", GROWTH_YAMLS, ids=lambda p: p.rsplit("/", 1)[-1])
def test_growth_yaml_loads_and_plans(path):
    from megatron_grow.config.check import check_recipe

    r = load_recipe(path)
    assert r.growth is not None
    p = make_growth_plan(r.model, r.growth)
    # the grown model must fit the recipe's parallel layout too
    assert check_recipe(dataclasses.replace(r, model=p.target, growth=None)) == []


def test_paper_yaml_targets():
    r = load_recipe(os.path.join(CONFIGS, "17b_to_35b.yaml"))
    assert make_growth_plan(r.model, r.growth).target.num_layers == 56
    r = load_recipe(os.path.join(CONFIGS, "35b_to_70b.yaml"))
    t = make_growth_plan(r.model, r.growth).target
    assert (t.num_layers, t.num_moe_experts, t.moe_router_topk) == (56, 192, 12)


def test_optimizer_carry_with_random_new_experts_is_refused(tmp_path):
    import dataclasses

    import pytest

    from megatron_grow.config.loader import load_recipe
    from megatron_grow.errors import GrowthError
    from megatron_grow.growth.grow import prepare_growth

    growth = load_recipe("configs/growth/tiny_depth_width.yaml").growth
    width = dataclasses.replace(growth.width, new_experts="random")
    growth = dataclasses.replace(growth, optimizer="carry", width=width)
    with pytest.raises(GrowthError, match="new_experts: random") as e:
        prepare_growth(str(tmp_path / "never-read"), growth)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "never-read").exists()


# ---- grouped routing (DeepSeek-V3 n_group/topk_group; docs/growth.md) ----------------------------------

GROUPED = ModelConfig(num_layers=2, num_moe_experts=8, moe_router_topk=4, moe_router_num_groups=4,
                      moe_router_group_topk=2)


def _mcore_route(scores_bias, model):
    """MCore's own sigmoid top-k (group-limited when the model has groups), from router logits."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    logits, bias = scores_bias
    probs, _ = topk_routing_with_score_function(
        logits, model.moe_router_topk, num_groups=model.moe_router_num_groups,
        group_topk=model.moe_router_group_topk, score_function="sigmoid", expert_bias=bias)
    return probs


@pytest.mark.parametrize("layout, groups, group_topk", [("append", 8, 4), ("interleave", 4, 2)])
def test_width_growth_of_a_grouped_router_keeps_the_routing(layout, groups, group_topk):
    import torch

    plan = make_growth_plan(GROUPED, grow(width=WidthGrowthConfig(factor=2, expert_layout=layout)))
    t = plan.target
    assert (t.num_moe_experts, t.moe_router_topk, t.moe_router_num_groups, t.moe_router_group_topk) == \
        (16, 8, groups, group_topk)
    src_of = torch.tensor(plan.expert_source[0])
    # every copy lands in a group holding only copies of its source expert's group
    size, src_size = 16 // groups, 8 // 4
    for j in range(16):
        assert {int(src_of[i]) // src_size for i in range(j // size * size, (j // size + 1) * size)} == \
            {int(src_of[j]) // src_size}
    # exact copies route as the source: the grown probabilities summed over each expert's copies are the source's
    g = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(64, 8, generator=g), 0.3 * torch.randn(8, generator=g)
    source = _mcore_route((logits, bias), GROUPED)
    grown = _mcore_route((logits[:, src_of], bias[src_of]), t)
    folded = torch.zeros_like(source).index_add_(1, src_of, grown)
    torch.testing.assert_close(folded, source, rtol=0, atol=1e-6)
    if layout == "append":  # the same copies with the source's group settings route differently
        kept = dataclasses.replace(t, moe_router_num_groups=4, moe_router_group_topk=2)
        wrong = torch.zeros_like(source).index_add_(1, src_of, _mcore_route((logits[:, src_of], bias[src_of]), kept))
        assert (wrong - source).abs().max() > 0.1


def test_grouped_routing_problems_name_the_field():
    from megatron_grow.config.check import grouped_routing_problems

    assert grouped_routing_problems(GROUPED) == []
    assert "set together" in grouped_routing_problems(dataclasses.replace(GROUPED, moe_router_group_topk=None))[0]
    assert "must divide model.num_moe_experts" in \
        grouped_routing_problems(dataclasses.replace(GROUPED, moe_router_num_groups=3))[0]
    assert "must divide model.moe_router_topk" in \
        grouped_routing_problems(dataclasses.replace(GROUPED, moe_router_group_topk=3, moe_router_num_groups=4))[0]
    problems = growth_problems(grow(width=WidthGrowthConfig(factor=2, topk_factor=1)), GROUPED)
    assert problems and "growth.width.topk_factor (1) must equal growth.width.factor (2)" in problems[0]
    from megatron_grow.config.schema import UpcycleGrowthConfig

    problems = growth_problems(grow(upcycle=UpcycleGrowthConfig(num_experts=10, allocation="uniform")), GROUPED)
    assert any("growth.upcycle" in p and "moe_router_num_groups" in p for p in problems)
