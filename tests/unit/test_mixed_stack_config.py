"""Mixed dense/MoE stacks in the recipe schema: ``model.moe_layer_freq`` (Megatron-LM's semantics) and
``model.ffn_hidden_size``, the grown layer pattern of each operator, and what is refused.

Expected patterns are written from the definitions: Megatron-LM's ``moe_layer_freq`` (an int N: layer i is
MoE iff i % N == 0; a list: one 0/1 per layer), and the operators' layer maps in docs/growth.md (a target
layer is a copy of its source layer, its kind included).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_grow.config.check import check_recipe
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import (
    DepthGrowthConfig,
    InsertGrowthConfig,
    ModelConfig,
    UpcycleGrowthConfig,
    WidthGrowthConfig,
    moe_layer_pattern,
)
from megatron_grow.errors import ConfigError
from megatron_grow.models.mcore_config import to_transformer_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "models" / "tiny.yaml"
MIXED = ModelConfig(num_layers=4, moe_layer_freq=(0, 1, 1, 0), ffn_hidden_size=80)


def test_the_default_stack_is_every_layer_moe_as_before():
    model = load_recipe(str(TINY)).model
    assert model.moe_layer_freq == 1 and model.ffn_hidden_size is None
    config = to_transformer_config(model)
    # exactly what the translation passed before mixed stacks existed: int 1 (MCore's stacked layout)
    assert config.moe_layer_freq == 1 and config.ffn_hidden_size == model.moe_ffn_hidden_size


def test_recipes_and_overrides_give_a_pattern():
    recipe = load_recipe(str(TINY), ["model.moe_layer_freq=[0,1,1,1]", "model.ffn_hidden_size=96"])
    assert recipe.model.moe_layer_freq == (0, 1, 1, 1) and recipe.model.ffn_hidden_size == 96
    assert check_recipe(recipe) == []
    config = to_transformer_config(recipe.model)
    assert config.moe_layer_freq == [0, 1, 1, 1] and config.ffn_hidden_size == 96   # MCore reads a list
    assert moe_layer_pattern(dataclasses.replace(recipe.model, moe_layer_freq=3)) == (1, 0, 0, 1)


@pytest.mark.parametrize("freq, needle", [((0, 1, 1), "must be 4 entries"), ((0, 2, 1, 1), "each 0 (dense) or 1"),
                                          (0, "must be >= 1")])
def test_a_bad_pattern_is_one_line_naming_the_field(freq, needle):
    with pytest.raises(ConfigError) as e:
        load_recipe(str(TINY), [f"model.moe_layer_freq={list(freq) if isinstance(freq, tuple) else freq}"])
    problems = e.value.problems
    assert len(problems) == 1 and problems[0].startswith("model.moe_layer_freq") and needle in problems[0]


def test_grown_pattern_follows_the_copies():
    # interposition x2: [0, 0, 1, 1, 2, 2, 3, 3]
    assert DepthGrowthConfig(factor=2).grown_model(MIXED).moe_layer_freq == (0, 0, 1, 1, 1, 1, 0, 0)
    # stack x2 with ignore_first 1: [0, 1, 2, 3] + [1, 2, 3]
    stack = DepthGrowthConfig(mode="stack", factor=2, ignore_first=1).grown_model(MIXED)
    assert stack.moe_layer_freq == (0, 1, 1, 0, 1, 1, 0)
    # insert after 0 and 2: [0, 0', 1, 2, 2', 3]
    assert InsertGrowthConfig(after=(0, 2)).grown_model(MIXED).moe_layer_freq == (0, 0, 1, 1, 1, 0)
    # width leaves the pattern alone
    assert WidthGrowthConfig(factor=2).grown_model(MIXED).moe_layer_freq == MIXED.moe_layer_freq
    # an all-MoE stack stays the int 1 (stored stacked, as before)
    assert DepthGrowthConfig(factor=2).grown_model(ModelConfig(num_layers=4)).moe_layer_freq == 1


def test_upcycle_refuses_a_mixed_stack_in_one_line():
    problems = UpcycleGrowthConfig(num_experts=6, allocation="uniform").problems(MIXED, "growth.upcycle")
    assert len(problems) == 1 and "use growth.width" in problems[0]
    assert UpcycleGrowthConfig(num_experts=6, allocation="uniform").problems(ModelConfig(), "growth.upcycle") == []
