"""Every YAML shipped under configs/ loads, validates and fits some world size."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_grow.analysis.run_estimate import choose_world_size
from megatron_grow.config.layout_rules import world_layout_problems
from megatron_grow.config.loader import load_recipe, recipe_to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))


def test_recipes_are_found():
    names = {p.relative_to(CONFIGS).as_posix() for p in RECIPES}
    expected = {f"models/{n}.yaml" for n in ("tiny", "3b", "3b_depth", "6b_width", "17b", "35b", "70b")}
    assert expected <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.relative_to(CONFIGS).as_posix() for p in RECIPES])
def test_recipe_loads_and_round_trips(path):
    recipe = load_recipe(str(path))
    assert load_recipe(raw=recipe_to_dict(recipe)) == recipe
    world, _ = choose_world_size(recipe, 8)
    assert world_layout_problems(recipe.parallel, world, recipe.training) == []


@pytest.mark.parametrize("name, tp, ep, pp", [("tiny", 2, 2, 2), ("tiny", 1, 4, 1), ("tiny", 2, 4, 2)])
def test_tiny_divides_small_layouts(name, tp, ep, pp):
    overrides = [f"parallel.tensor_model_parallel_size={tp}", f"parallel.expert_model_parallel_size={ep}",
                 f"parallel.pipeline_model_parallel_size={pp}"]
    recipe = load_recipe(str(CONFIGS / "models" / f"{name}.yaml"), overrides)
    from megatron_grow.config.layout_rules import padded_vocab_size

    assert padded_vocab_size(recipe.model, tp) == recipe.model.vocab_size


def test_paper_vocab_is_not_padded():
    from megatron_grow.config.layout_rules import padded_vocab_size

    for name in ("3b", "17b", "70b"):
        recipe = load_recipe(str(CONFIGS / "models" / f"{name}.yaml"))
        assert padded_vocab_size(recipe.model, recipe.parallel.tensor_model_parallel_size) == 200064
