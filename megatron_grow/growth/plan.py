"""A validated growth plan: the composed index maps from a source model to its grown target.

Input: the source ``ModelConfig`` and the recipe's ``GrowthConfig``. Output: a frozen
``GrowthPlan`` (``growth.operators.base``) holding the target ``ModelConfig``, the bound
operators in the recipe's order and, for every target layer and target expert, the source it
reads (each operator's maps from ``growth.operators``, composed in that order; expert maps per
target layer, following the layer maps back to the layer each operator saw). No tensors, no
I/O: the plan is what both the plain-tensor oracle and the sharded loader consume.

Order matters only for which layer index keys per-layer noise (``layer_index_after``):

- depth then width: width acts on the deep model, so every depth copy of a layer is
  widened independently and its copies get their own noise -> keyed by the *target* layer;
- width then depth: the layer is widened (noised) once and then copied, so depth copies
  carry identical noise -> keyed by the *source* layer.

Depth copies are exact either way; ``identity_init`` zeroing of new depth copies is applied
last (after width noise), so it gives the same tensors in both orders.
"""

from __future__ import annotations

import dataclasses

from megatron_grow.config.growth_rules import growth_problems, resolved_order
from megatron_grow.config.schema import GrowthConfig, ModelConfig
from megatron_grow.errors import ConfigError
from megatron_grow.growth.mapping import ComposedMap, IndexMap, compose
from megatron_grow.growth.operators import operator_class
from megatron_grow.growth.operators.base import GrowthOperator, GrowthPlan

__all__ = ["GrowthPlan", "make_growth_plan"]


def with_inputs(growth: GrowthConfig) -> GrowthConfig:
    """``growth`` with every section's named files read into its fields (``GrowthSection.with_inputs``),
    so the plan, and the growth record made from it, hold what the files said."""
    read = {name: section.with_inputs(f"growth.{name}") for name, section in growth.sections().items()}
    return dataclasses.replace(growth, **read)


def make_growth_plan(source: ModelConfig, growth: GrowthConfig) -> GrowthPlan:
    """Validate ``growth`` against ``source`` and compose its operators' index maps.

    Args:
        source: the source model.
        growth: the recipe's growth section.

    Returns:
        The plan.

    Raises:
        ConfigError: every problem of ``growth``, one line each naming its key.
    """
    growth = with_inputs(growth)
    problems = growth_problems(growth, source)
    if problems:
        raise ConfigError(problems)
    order = resolved_order(growth)
    operators: list[GrowthOperator] = [operator_class(name)(getattr(growth, name)) for name in order]
    layer_maps, models, model = [], [], source
    for op in operators:
        layer_maps.append(op.layer_map(model))
        models.append(model)
        model = op.config.grown_model(model)
        # The section's rule (config) and the operator's map must agree on the grown sizes.
        assert len(layer_maps[-1]) == model.num_layers, op.name
    layers = compose(layer_maps, model.num_layers)
    experts = _per_layer_expert_maps(operators, models, layer_maps, layers, model.num_moe_experts)
    return GrowthPlan(
        source=source,
        target=model,
        growth=growth,
        order=order,
        operators=tuple(operators),
        layer_source=layers.source,
        layer_is_new_copy=tuple(c > 0 for c in layers.copy_index),
        expert_source=tuple(m.source for m in experts),
        expert_copy_index=tuple(m.copy_index for m in experts),
        layers_after=layers.after,
    )


def _per_layer_expert_maps(operators: list[GrowthOperator], models: list[ModelConfig], layer_maps: list[IndexMap],
                           layers: ComposedMap, num_experts: int) -> list[ComposedMap]:
    """The composed expert map of every target layer: operator ``k`` maps the experts of the layer of its
    input that the target layer descends from (so a depth copy carries its layer's map, whichever
    side of the expert operator the depth operator is)."""
    cache: dict[tuple[int, int], IndexMap] = {}
    out = []
    for j, source_layer in enumerate(layers.source):
        maps = []
        for k, op in enumerate(operators):
            layer_in = layer_maps[k].source[layers.after[k][j]]
            if (k, layer_in) not in cache:
                m = op.expert_map(models[k], layer_in, source_layer)
                # The section's rule (config) and the operator's map must agree on the grown sizes.
                assert len(m) == op.config.grown_model(models[k]).num_moe_experts, op.name
                cache[(k, layer_in)] = m
            maps.append(cache[(k, layer_in)])
        out.append(compose(maps, num_experts))
    return out
