"""A validated growth plan: the composed index maps from a source model to its grown target.

Input: the source ``ModelConfig`` and the recipe's ``GrowthConfig``. Output: a frozen
``GrowthPlan`` holding the target ``ModelConfig`` and, for every target layer and target
expert, the source it reads (depth and width maps from ``growth.mapping`` composed in the
recipe's order). No tensors, no I/O: the plan is what both the plain-tensor oracle and the
sharded loader consume.

Order matters only for which layer index keys the width noise (``noise_layer``):

- depth then width: width acts on the deep model, so every depth copy of a layer is
  widened independently and its copies get their own noise -> keyed by the *target* layer;
- width then depth: the layer is widened (noised) once and then copied, so depth copies
  carry identical noise -> keyed by the *source* layer.

Depth copies are exact either way; ``identity_init`` zeroing of new depth copies is applied
last (after width noise), so it gives the same tensors in both orders.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_grow.config.growth_rules import grown_model, growth_problems, resolved_order, topk_factor
from megatron_grow.config.schema import GrowthConfig, ModelConfig
from megatron_grow.errors import ConfigError
from megatron_grow.growth.mapping import (
    DepthMap,
    WidthMap,
    build_depth_map,
    build_width_map,
    identity_depth_map,
    identity_width_map,
)


@dataclass(frozen=True)
class GrowthPlan:
    """Everything needed to produce target tensors from source tensors.

    ``layer_source[j]``: source layer of target layer ``j``; ``layer_is_new_copy[j]``: the
    target layer is a depth copy (not the first occurrence of its source layer).
    ``expert_source[e]``: source expert of target expert ``e``; ``expert_copy_index[e]``: 0 for
    the original, 1..m-1 for copies. Identity maps when the operator is off.
    """

    source: ModelConfig
    target: ModelConfig
    growth: GrowthConfig
    order: tuple[str, ...]
    layer_source: tuple[int, ...]
    layer_is_new_copy: tuple[bool, ...]
    expert_source: tuple[int, ...]
    expert_copy_index: tuple[int, ...]

    @property
    def depth_first(self) -> bool:
        """True when depth runs before width (or only one operator runs)."""
        return self.order.index("depth") < self.order.index("width") if len(self.order) == 2 else True

    @property
    def width_factor(self) -> int:
        return self.growth.width.factor if self.growth.width is not None else 1

    def noise_layer(self, target_layer: int) -> int:
        """The layer index that keys width noise for ``target_layer`` (see the module docstring)."""
        if not 0 <= target_layer < len(self.layer_source):
            raise IndexError(f"target layer {target_layer} out of range [0, {len(self.layer_source)})")
        return target_layer if self.depth_first else self.layer_source[target_layer]

    def is_original_expert(self, target_expert: int) -> bool:
        return self.expert_copy_index[target_expert] == 0

    def counts(self) -> dict[str, tuple[int, int]]:
        """Before/after sizes: ``{name: (source, target)}``; parameters are counted in models.params."""
        s, t = self.source, self.target
        return {
            "num_layers": (s.num_layers, t.num_layers),
            "num_moe_experts": (s.num_moe_experts, t.num_moe_experts),
            "moe_router_topk": (s.moe_router_topk, t.moe_router_topk),
            "experts_total": (s.num_layers * s.num_moe_experts, t.num_layers * t.num_moe_experts),
        }


# ----------------------------------------------------------------------------------------------
# Plan


def make_growth_plan(source: ModelConfig, growth: GrowthConfig) -> GrowthPlan:
    """Validate ``growth`` against ``source`` and compose its index maps; raises ``ConfigError``."""
    problems = growth_problems(growth, source)
    if problems:
        raise ConfigError(problems)
    d, w = growth.depth, growth.width
    target = grown_model(source, growth)
    dmap: DepthMap = (build_depth_map(source.num_layers, d.mode, d.factor, d.ignore_first, d.ignore_last)
                      if d is not None else identity_depth_map(source.num_layers))
    wmap: WidthMap = (build_width_map(source.num_moe_experts, w.factor, w.expert_layout)
                      if w is not None else identity_width_map(source.num_moe_experts))
    # The rules (config.growth_rules) and the index maps must agree on the grown sizes.
    assert (dmap.num_layers, wmap.num_experts) == (target.num_layers, target.num_moe_experts)
    assert target.moe_router_topk == source.moe_router_topk * topk_factor(growth)
    # Depth and width act on different axes, so the composition is the pair of maps in either
    # order; only the noise keying (noise_layer) depends on the order.
    return GrowthPlan(
        source=source,
        target=target,
        growth=growth,
        order=resolved_order(growth),
        layer_source=dmap.source_layer,
        layer_is_new_copy=dmap.is_new_copy,
        expert_source=wmap.source_expert,
        expert_copy_index=wmap.copy_index,
    )
