"""Depth growth: copy decoder layers (docs/paper.md §1, docs/growth.md).

Index map over layers only; copies are exact. With ``identity_init`` a new copy starts with its
attention ``linear_proj`` and (shared-)expert ``linear_fc2`` at zero (LLaMA-Pro), so each new
block starts as the identity on the residual stream; that zeroing is applied after every other
transform, so it gives the same tensors in any operator order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_grow.config.schema import (
    DepthGrowthConfig,
    DepthMode,
    ModelConfig,
    depth_source_layers,
    grown_depth,
    values,
)
from megatron_grow.growth.mapping import IndexMap, first_occurrence_copies
from megatron_grow.growth.noise import FC2_KEY
from megatron_grow.growth.operators.base import GrowthOperator, GrowthPlan

DEPTH_MODES = values(DepthMode)


@dataclass(frozen=True)
class DepthMap:
    """Target layer -> source layer, and whether the target layer is a (non-first) copy."""

    source_layer: tuple[int, ...]
    is_new_copy: tuple[bool, ...]

    @property
    def num_layers(self) -> int:
        return len(self.source_layer)


def build_depth_map(num_layers: int, mode: str, factor: int, ignore_first: int = 0,
                    ignore_last: int = 0) -> DepthMap:
    """Index map of depth growth.

    interposition: ``[0]*1 .. [first-1]*1, [first]*k, ..., [L-last-1]*k, [L-last]*1 .. [L-1]*1``
    (without ignores, target ``j`` reads ``j // k``).
    stack: the block repeated k times (``j % L`` without ignores); copy 0 covers
    ``[0, L-last)``, middle copies ``[first, L-last)``, the final copy ``[first, L)``, so the
    first/last ``N`` layers appear only at the very bottom/top (the paper's scripts).

    Args:
        num_layers: source layers L.
        mode: a ``DepthMode`` value.
        factor: growth factor k (1 is the identity).
        ignore_first: the first N layers appear once.
        ignore_last: the last N layers appear once.

    Returns:
        The map; ``is_new_copy`` is False at each source layer's first occurrence.
    """
    if mode not in DEPTH_MODES:
        raise ValueError(f"depth mode {mode!r} is not one of {DEPTH_MODES}")
    if factor < 1:
        raise ValueError(f"depth factor must be >= 1, got {factor}")
    if ignore_first < 0 or ignore_last < 0 or ignore_first + ignore_last >= num_layers:
        raise ValueError(f"ignore_first + ignore_last ({ignore_first} + {ignore_last}) must be >= 0 and "
                         f"< num_layers ({num_layers})")
    src = depth_source_layers(num_layers, mode, factor, ignore_first, ignore_last)
    assert len(src) == grown_depth(num_layers, factor, ignore_first, ignore_last)
    return DepthMap(tuple(src), tuple(c > 0 for c in first_occurrence_copies(src)))


_IDENTITY_ZEROED = (
    re.compile(r"(^|\.)self_attention\.linear_proj\.(weight|bias)$"),
    # local spec: experts.local_experts.<e>.linear_fc2; TE grouped: experts.linear_fc2.weight<e>;
    # dist-ckpt storage: experts.experts.linear_fc2
    re.compile(r"(^|\.)experts\.(local_experts\.\d+\.|experts\.)?linear_fc2\.(weight|bias)\d*$"),
    re.compile(r"(^|\.)shared_experts\.linear_fc2\.(weight|bias)$"),
    # the dense MLP of a non-MoE layer (model.moe_layer_freq)
    re.compile(r"(^|\.)mlp\.linear_fc2\.(weight|bias)$"),
)


def zeroed_by_identity_init(name: str) -> bool:
    """True for the tensors a new depth copy starts at zero with ``identity_init``.

    ``name`` is a state-dict key (full or relative to the layer) or a logical key. Zeroed:
    attention ``linear_proj``, routed-expert, shared-expert and dense-MLP ``linear_fc2``
    (weights and biases), so each new block starts as the identity on the residual stream.
    """
    if name == FC2_KEY:
        return True
    return any(p.search(name) for p in _IDENTITY_ZEROED)


class DepthOperator(GrowthOperator):
    """``growth.depth``: layers L -> k*L (less the ignored layers), exact copies."""

    name = "depth"
    config_type = DepthGrowthConfig
    config: DepthGrowthConfig

    def layer_map(self, model: ModelConfig) -> IndexMap:
        c = self.config
        m = build_depth_map(model.num_layers, c.mode, c.factor, c.ignore_first, c.ignore_last)
        return IndexMap(m.source_layer, first_occurrence_copies(m.source_layer))

    def zeroes(self, plan: GrowthPlan, target_layer: int, name: str) -> bool:
        return bool(self.config.identity_init and plan.layer_is_new_copy[target_layer]
                    and zeroed_by_identity_init(name))

    @classmethod
    def describe(cls, section: dict) -> str:
        extra = "".join(f", {k}={section[k]}" for k in ("ignore_first", "ignore_last") if section.get(k))
        if section.get("identity_init"):
            extra += ", identity_init"
        return f"depth {section.get('mode')} x{section.get('factor')}{extra}"
