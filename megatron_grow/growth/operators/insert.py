"""Depth by insertion (LLaMA Pro block expansion, arXiv 2401.02415; docs/growth.md).

L -> L + n layers: after each chosen source layer ``p`` a new block is inserted that copies layer
``p`` whole (norms, attention, router, experts, expert bias) and then has its attention
``linear_proj`` and its routed and shared experts' ``linear_fc2`` (weights and biases) set to zero,
so both residual branches add zero and the block is the identity on the residual stream. The
original layers keep their order and values. Index map over layers only; no noise.
"""

from __future__ import annotations

from megatron_grow.config.schema import InsertGrowthConfig, ModelConfig, insertion_points, insertion_sources
from megatron_grow.growth.mapping import IndexMap, first_occurrence_copies
from megatron_grow.growth.operators.base import GrowthOperator, GrowthPlan
from megatron_grow.growth.operators.depth import zeroed_by_identity_init


class InsertOperator(GrowthOperator):
    """``growth.insert``: identity-initialised blocks inserted after chosen layers (any count)."""

    name = "insert"
    config_type = InsertGrowthConfig
    config: InsertGrowthConfig

    def layer_map(self, model: ModelConfig) -> IndexMap:
        points = insertion_points(model.num_layers, self.config.every, self.config.after)
        src = insertion_sources(model.num_layers, points)
        return IndexMap(src, first_occurrence_copies(src))

    def _new_blocks(self, plan: GrowthPlan) -> tuple[bool, ...]:
        """Per layer of this operator's output: whether it is an inserted block."""
        model = plan.source
        for op in plan.operators:
            if op is self:
                return tuple(c > 0 for c in self.layer_map(model).copy_index)
            model = op.config.grown_model(model)
        raise ValueError("the insert operator is not part of this plan")

    def zeroes(self, plan: GrowthPlan, target_layer: int, name: str) -> bool:
        # Keyed by the layer's index in this operator's output, so a later depth copy of an inserted
        # block is zeroed too and an earlier depth copy (not inserted here) is left alone.
        inserted = self._new_blocks(plan)[plan.layer_index_after(self.name, target_layer)]
        return inserted and zeroed_by_identity_init(name)

    @classmethod
    def describe(cls, section: dict) -> str:
        where = f"every {section.get('every')}" if section.get("every") else f"after {list(section.get('after', ()))}"
        return f"insert identity blocks ({where}; copies of the preceding layer)"
