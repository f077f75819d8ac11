"""Width growth: duplicate experts, add noise to the copies and raise top-k (docs/paper.md §2).

The index map is over experts only (every layer alike). The transforms touch the routed
experts' ``linear_fc1``/``linear_fc2`` (``noise.EXPERT_KEYS``), the router weight and the
router's ``expert_bias``; every draw comes from ``noise.noise_generator`` keyed by
``(growth.seed, logical key, layer, expert[, stream])`` over the full per-expert (or per-row)
shape, so the grown tensors do not depend on the layout (``growth.noise``). The layer that keys
the noise is the target layer's index in the model width produced
(``GrowthPlan.layer_index_after``): a later depth copy carries its source layer's noise.

Legend for shape suffixes: E experts, H model dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_grow.config.schema import (
    ExpertLayout,
    ModelConfig,
    NewExperts,
    NoiseGranularity,
    NoiseKind,
    WidthGrowthConfig,
    values,
)
from megatron_grow.growth.mapping import IndexMap
from megatron_grow.growth.noise import (
    EXPERT_BIAS_KEY,
    FC2_KEY,
    ROUTER_KEY,
    Moments,
    canonical_std,
    combine_moments,
    noise_generator,
    std_from_moments,
    tensor_std,
)
from megatron_grow.growth.operators.base import GrowthOperator, GrowthPlan

EXPERT_LAYOUTS = values(ExpertLayout)


@dataclass(frozen=True)
class WidthMap:
    """Target expert -> source expert, and which member of its copy group it is (0 = original)."""

    source_expert: tuple[int, ...]
    copy_index: tuple[int, ...]

    @property
    def num_experts(self) -> int:
        return len(self.source_expert)


def build_width_map(num_experts: int, factor: int, layout: str) -> WidthMap:
    """Index map of width growth: E -> m*E experts.

    append: target ``e`` reads ``e % E`` and is copy ``e // E`` (copies after all originals).
    interleave: target ``e`` reads ``e // m`` and is copy ``e % m`` (``[e0, e0', e1, e1', ...]``).

    Args:
        num_experts: source experts E.
        factor: growth factor m (1 is the identity).
        layout: an ``ExpertLayout`` value.

    Returns:
        The map.
    """
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert layout {layout!r} is not one of {EXPERT_LAYOUTS}")
    if factor < 1 or num_experts < 1:
        raise ValueError(f"need num_experts >= 1 and factor >= 1, got {num_experts} and {factor}")
    n = num_experts * factor
    if layout == ExpertLayout.APPEND:
        return WidthMap(tuple(e % num_experts for e in range(n)), tuple(e // num_experts for e in range(n)))
    return WidthMap(tuple(e // factor for e in range(n)), tuple(e % factor for e in range(n)))


class WidthOperator(GrowthOperator):
    """``growth.width``: experts E -> m*E and top-k k -> topk_factor*k, copies noised."""

    name = "width"
    config_type = WidthGrowthConfig
    config: WidthGrowthConfig

    def expert_map(self, model: ModelConfig, layer: int, source_layer: int) -> IndexMap:
        m = build_width_map(model.num_moe_experts, self.config.factor, self.config.expert_layout)
        return IndexMap(m.source_expert, m.copy_index)

    def noise_layer(self, plan: GrowthPlan, target_layer: int) -> int:
        """The layer index that keys this operator's noise for ``target_layer``."""
        return plan.layer_index_after(self.name, target_layer)

    # ---- routed experts -----------------------------------------------------------------------

    def needs_expert_stats(self) -> bool:
        w = self.config
        return bool(w.new_experts == NewExperts.COPY and w.noise in (NoiseKind.GAUSSIAN, NoiseKind.ANTITHETIC)
                    and w.alpha > 0)

    def expert_noise_std(self, moments_by_expert: Sequence[Moments], source_expert: int) -> float | None:
        """per_layer: the std of all experts' elements, combined in expert order (fused-GEMM runs)."""
        if self.config.noise_granularity == NoiseGranularity.PER_LAYER:
            return canonical_std(std_from_moments(combine_moments(moments_by_expert)))
        return None

    def expert_tensor(self, plan: GrowthPlan, value: torch.Tensor, *, logical_key: str, target_layer: int,
                      target_expert: int, std: float, full_shape: tuple[int, ...], region: tuple) -> torch.Tensor:
        """Originals exact under gaussian/none; antithetic also perturbs the original's fc2 (zero-sum
        group); ``new_experts: random`` replaces copies with N(0, init_method_std^2). Noise is added in
        fp32, then cast."""
        if self.config.new_experts == NewExperts.RANDOM:
            if plan.expert_copy_index[target_layer][target_expert] == 0:
                return value  # the ablation keeps the originals exact, whatever `noise` says
            g = noise_generator(plan.growth.seed, logical_key, self.noise_layer(plan, target_layer), target_expert)
            fresh = torch.randn(full_shape, generator=g, dtype=torch.float32) * plan.source.init_method_std
            return fresh[region].to(dtype=value.dtype, device=value.device).clone()
        noise = self._expert_noise_fp32(plan, logical_key, target_layer, target_expert, full_shape, std)
        if noise is None:
            return value
        noise = noise[region].to(value.device)
        if noise.shape != value.shape:
            raise ValueError(f"{logical_key}: source slice shape {tuple(value.shape)} does not match region "
                             f"{region} of full shape {full_shape}")
        # fp32(value) + noise, summed into the noise's own buffer (addition commutes exactly; no new tensor)
        return noise.add_(value.to(torch.float32)).to(value.dtype)

    def _expert_noise_fp32(self, plan: GrowthPlan, logical_key: str, target_layer: int, target_expert: int,
                           full_shape: tuple[int, ...], std: float) -> torch.Tensor | None:
        """Full-shape fp32 noise *added* to the source for this target expert, or None for none."""
        w = self.config
        copy_idx = plan.expert_copy_index[target_layer][target_expert]
        scale = w.alpha * std
        if w.noise == NoiseKind.NONE or scale == 0.0:
            return None
        layer = self.noise_layer(plan, target_layer)
        seed = plan.growth.seed
        if w.noise == NoiseKind.GAUSSIAN:
            if copy_idx == 0:
                return None  # originals stay exact
            g = noise_generator(seed, logical_key, layer, target_expert)
            return torch.randn(full_shape, generator=g, dtype=torch.float32).mul_(scale)
        # antithetic: zero-sum fc2 noise within the copy group; fc1 exact keeps every member's
        # hidden activation equal to the source's, so the group's (equal-weight) output is exact.
        if logical_key != FC2_KEY:
            return None
        src_expert = plan.expert_source[target_layer][target_expert]

        def eps(c: int) -> torch.Tensor:
            g = noise_generator(seed, logical_key, layer, src_expert, stream=c)
            return torch.randn(full_shape, generator=g, dtype=torch.float32) * scale

        if copy_idx < w.factor - 1:
            return eps(copy_idx)
        total = eps(0)
        for c in range(1, w.factor - 1):
            total = total + eps(c)
        return -total

    # ---- router ---------------------------------------------------------------------------------

    def _row_noise_fp32(self, plan: GrowthPlan, logical_key: str, target_layer: int, target_expert: int,
                        row_shape: tuple[int, ...], scale: float) -> torch.Tensor:
        g = noise_generator(plan.growth.seed, logical_key, self.noise_layer(plan, target_layer), target_expert)
        return torch.randn(row_shape, generator=g, dtype=torch.float32) * scale

    def router(self, plan: GrowthPlan, target_layer: int, grown_EH: torch.Tensor,
               source_EH: torch.Tensor) -> torch.Tensor:
        """gaussian: copy rows get N(0, (alpha * canonical_std(std of the whole source router))^2), one
        generator per (noise layer, target expert); antithetic/none: exact copies; new_experts random:
        copy rows N(0, init_method_std^2)."""
        w = self.config
        row_shape = tuple(source_EH.shape[1:])
        if w.new_experts == NewExperts.RANDOM:
            scale, add = plan.source.init_method_std, False
        elif w.noise == NoiseKind.GAUSSIAN:
            scale, add = w.alpha * tensor_std(source_EH), True
            if scale == 0.0:
                return grown_EH
        else:
            return grown_EH
        for e, c in enumerate(plan.expert_copy_index[target_layer]):
            if c == 0:
                continue
            row = self._row_noise_fp32(plan, ROUTER_KEY, target_layer, e, row_shape, scale).to(grown_EH.device)
            grown_EH[e] = (grown_EH[e].to(torch.float32) + row if add else row).to(grown_EH.dtype)
        return grown_EH

    def expert_bias(self, plan: GrowthPlan, target_layer: int, grown_E: torch.Tensor,
                    source_E: torch.Tensor) -> torch.Tensor:
        """zero_expert_bias: all zeros; new_experts random: copies 0; gaussian: copies get
        N(0, (alpha * canonical_std(std of the source bias vector))^2) (no noise while the bias is
        constant, e.g. freshly initialised); antithetic/none: exact copies."""
        w = self.config
        if w.zero_expert_bias:
            return torch.zeros_like(grown_E)
        if w.new_experts == NewExperts.RANDOM:
            for e, c in enumerate(plan.expert_copy_index[target_layer]):
                if c > 0:
                    grown_E[e] = 0
            return grown_E
        if w.noise != NoiseKind.GAUSSIAN:
            return grown_E
        scale = w.alpha * tensor_std(source_E)
        if scale == 0.0:
            return grown_E
        for e, c in enumerate(plan.expert_copy_index[target_layer]):
            if c > 0:
                eps = self._row_noise_fp32(plan, EXPERT_BIAS_KEY, target_layer, e, (), scale).to(grown_E.device)
                grown_E[e] = (grown_E[e].to(torch.float32) + eps).to(grown_E.dtype)
        return grown_E

    # ---- optimizer state / records ----------------------------------------------------------------

    def carry_problem(self, optimizer: str) -> str | None:
        if self.config.new_experts == NewExperts.RANDOM:
            return (f"growth.optimizer: {optimizer} cannot be combined with growth.width.new_experts: random "
                    "(randomly initialised experts have no source whose Adam state they could take); use "
                    "growth.optimizer: reset")
        return None

    @classmethod
    def describe(cls, section: dict) -> str:
        topk = section.get("topk_factor") or section.get("factor")
        return (f"width x{section.get('factor')} (top-k x{topk}, {section.get('expert_layout')}, noise "
                f"{section.get('noise')} alpha={section.get('alpha')} {section.get('noise_granularity')}, "
                f"new experts {section.get('new_experts')})")
