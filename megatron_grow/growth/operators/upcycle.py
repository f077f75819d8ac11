"""Expert upcycling: E -> E' experts for any E' > E, top-k fixed (Expert Upcycling, arXiv 2604.19835).

Which source experts are copied, and how many times, is an allocation of each layer's ``E' - E``
new experts: in proportion to each expert's utility in that layer (its routing share in that
layer measured on calibration tokens, ``megatron-grow route-stats``) by the largest-remainder
rule, or uniformly (the same for every layer). Copies are
exact (routed-expert weights and router rows); the only perturbation is optional noise on the
copies' router ``expert_bias`` (``bias_noise``), drawn from ``noise.noise_generator`` keyed by
``(growth.seed, "router.expert_bias", layer, target expert)``, so it does not depend on the
layout. Top-k is unchanged, so the compute per token is unchanged. docs/growth.md, "Expert
upcycling", is the definition.

Legend for shape suffixes: E experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch

from megatron_grow.config.schema import ExpertLayout, ModelConfig, UpcycleGrowthConfig
from megatron_grow.growth.mapping import IndexMap
from megatron_grow.growth.noise import EXPERT_BIAS_KEY, noise_generator
from megatron_grow.growth.operators.base import GrowthOperator, GrowthPlan


def allocate_copies(utility: Sequence[float], new_experts: int) -> tuple[int, ...]:
    """How many copies of each expert: largest remainder over ``utility``, ties to the lower index.

    Expert ``e``'s quota is ``q_e = n * u_e / sum(u)`` (``n = new_experts``), computed exactly
    (``Fraction`` of the floats); it first gets ``floor(q_e)`` copies, then the ``n - sum(floor)``
    left over go one each to the experts with the largest ``q_e - floor(q_e)``, the lower index
    first among equals. All-zero utility counts as uniform.

    Args:
        utility: one non-negative number per source expert.
        new_experts: ``E' - E``.

    Returns:
        ``copies[e]`` per source expert, summing to ``new_experts``.
    """
    if new_experts < 0 or not utility or any(u < 0 for u in utility):
        raise ValueError(f"need new_experts >= 0 and non-negative utility, got {new_experts} and {list(utility)}")
    exact = [Fraction(u) for u in utility]
    total = sum(exact)
    if total == 0:
        exact, total = [Fraction(1)] * len(utility), Fraction(len(utility))
    quotas = [new_experts * u / total for u in exact]
    copies = [int(q) for q in quotas]  # floor: quotas are >= 0
    left = new_experts - sum(copies)
    by_remainder = sorted(range(len(quotas)), key=lambda e: (-(quotas[e] - copies[e]), e))
    for e in by_remainder[:left]:
        copies[e] += 1
    return tuple(copies)


def upcycle_map(copies: Sequence[int], layout: str) -> IndexMap:
    """The expert map for ``copies[e]`` extra copies of each source expert ``e``.

    append: targets ``0..E-1`` are the originals, then the copies of expert 0, of expert 1, ...;
    interleave: each expert followed by its copies. Copy index 0 is the original, then 1, 2, ...

    Args:
        copies: copies per source expert.
        layout: an ``ExpertLayout`` value.

    Returns:
        The map (``E + sum(copies)`` entries).
    """
    if layout == ExpertLayout.APPEND:
        source = list(range(len(copies))) + [e for e, c in enumerate(copies) for _ in range(c)]
        index = [0] * len(copies) + [i for c in copies for i in range(1, c + 1)]
    else:
        source = [e for e, c in enumerate(copies) for _ in range(c + 1)]
        index = [i for c in copies for i in range(c + 1)]
    return IndexMap(tuple(source), tuple(index))


class UpcycleOperator(GrowthOperator):
    """``growth.upcycle``: experts E -> E' (any E' > E) by utility or uniformly, top-k fixed."""

    name = "upcycle"
    config_type = UpcycleGrowthConfig
    config: UpcycleGrowthConfig

    def copies(self, model: ModelConfig, source_layer: int) -> tuple[int, ...]:
        """Copies per expert of one layer of ``model``: by the utility row of ``source_layer`` (the
        source layer it descends from; a single row serves every layer), or uniform."""
        rows = self.config.layer_rows()
        utility = rows[source_layer if len(rows) > 1 else 0] if rows else [1.0] * model.num_moe_experts
        return allocate_copies(utility, self.config.num_experts - model.num_moe_experts)

    def expert_map(self, model: ModelConfig, layer: int, source_layer: int) -> IndexMap:
        return upcycle_map(self.copies(model, source_layer), self.config.expert_layout)

    def expert_bias(self, plan: GrowthPlan, target_layer: int, grown_E: torch.Tensor,
                    source_E: torch.Tensor) -> torch.Tensor:
        """Copies: the source entry + bias_noise * eps, eps ~ N(0, 1) from one generator per (layer
        after this operator, target expert); with unselected_copies, min(source bias) - 2 -
        bias_noise * |eps| instead (a sigmoid score is in [0, 1], so a copy's score plus bias stays
        below every original's). Originals exact. Computed in fp32, then cast."""
        std, unselected = self.config.bias_noise, self.config.unselected_copies
        if std == 0.0 and not unselected:
            return grown_E
        layer = plan.layer_index_after(self.name, target_layer)
        floor = source_E.to(torch.float32).min() - 2.0
        for e, c in enumerate(plan.expert_copy_index[target_layer]):
            if c > 0:
                g = noise_generator(plan.growth.seed, EXPERT_BIAS_KEY, layer, e)
                eps = (torch.randn((), generator=g, dtype=torch.float32) * std).to(grown_E.device)
                value = floor.to(grown_E.device) - eps.abs() if unselected else grown_E[e].to(torch.float32) + eps
                grown_E[e] = value.to(grown_E.dtype)
        return grown_E

    @classmethod
    def describe(cls, section: dict) -> str:
        sha = section.get("utility_stats_sha256")
        source = f", stats {section.get('utility_stats')} sha256 {sha[:12]}" if sha else ""
        shares = section.get("utility_shares")
        if section.get("allocation") == "utility" and shares and isinstance(shares[0], (list, tuple)):
            source += f", each of {len(shares)} layers by its own shares"
        return (f"upcycle -> {section.get('num_experts')} experts (top-k fixed, {section.get('allocation')}"
                f"{source}, {section.get('expert_layout')}, bias noise {section.get('bias_noise')}"
                f"{', copies unselected' if section.get('unselected_copies') else ''})")
