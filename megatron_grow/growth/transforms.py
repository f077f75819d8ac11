"""Grow one tensor: gather it through the plan's index maps, then let each operator transform it.

The engine's single entry per tensor kind, shared by the sharded loader (``growth.retarget``),
the optimizer carry (``growth.optimizer_state``) and the plain-tensor oracle
(``growth.reference``). Nothing here names an operator: each tensor goes through every operator
of the plan in order (``growth.operators.base.GrowthOperator``), and a tensor any operator zeroes
is zero whatever the others did (zeroing is applied last, so it is the same in every order).

Legend for shape suffixes: E experts, H model dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from megatron_grow.growth.noise import EXPERT_KEYS, Moments, canonical_std, std_from_moments
from megatron_grow.growth.operators.base import GrowthPlan


def zeroed(plan: GrowthPlan, target_layer: int, name: str) -> bool:
    """Whether ``name`` in ``target_layer`` of the grown model starts at zero (e.g. ``identity_init``).

    Args:
        plan: the growth plan.
        target_layer: a layer index in the grown model.
        name: a state-dict key (full or relative to the layer) or a logical key.

    Returns:
        True when some operator of the plan zeroes it.
    """
    return any(op.zeroes(plan, target_layer, name) for op in plan.operators)


def needs_expert_stats(plan: GrowthPlan) -> bool:
    """Whether noise scales depend on the std of source expert tensors (a statistics pass).

    Args:
        plan: the growth plan.

    Returns:
        True when some operator of the plan needs them.
    """
    return any(op.needs_expert_stats() for op in plan.operators)


def expert_noise_std(plan: GrowthPlan, moments_by_expert: Sequence[Moments], source_expert: int) -> float:
    """The std that scales the noise of ``source_expert``'s copies, for one logical key and layer.

    Args:
        plan: the growth plan.
        moments_by_expert: the moments of each source expert's tensor (all source experts of the
            layer, in expert order).
        source_expert: the source expert.

    Returns:
        An operator's choice (width's per_layer: all experts' elements combined in expert order),
        else that expert's own std; rounded by ``canonical_std``.
    """
    for op in plan.operators:
        std = op.expert_noise_std(moments_by_expert, source_expert)
        if std is not None:
            return std
    return canonical_std(std_from_moments(moments_by_expert[source_expert]))


def _region(region: tuple | None, ndim: int) -> tuple:
    if region is None:
        return (slice(None),) * ndim
    return tuple(region)


def grow_expert_tensor(plan: GrowthPlan, logical_key: str, target_layer: int, target_expert: int,
                       source_expert_tensor: torch.Tensor, std: float, *,
                       full_shape: Sequence[int] | None = None,
                       region: tuple | None = None, may_alias: bool = False) -> torch.Tensor:
    """The target tensor of one expert, from its source expert's tensor (same dtype).

    Args:
        plan: the growth plan.
        logical_key: ``noise.FC1_KEY`` or ``noise.FC2_KEY``.
        target_layer: the layer index in the grown model.
        target_expert: the expert index in the grown model.
        source_expert_tensor: the full per-expert tensor of ``plan.expert_source[target_layer][target_expert]``
            in source layer ``plan.layer_source[target_layer]`` -- or only ``region`` of it.
        std: the (canonical) std of the source tensor, per expert or per layer
            (``expert_noise_std``); not computed here so that a sharded caller can supply it.
        full_shape: the full per-expert shape when ``source_expert_tensor`` is a region.
        region: a tuple of slices into the full tensor; the result is then exactly ``region`` of
            the full result, because noise is always generated over the full shape.
        may_alias: the caller copies the result (into a parameter, or to the writer): an unchanged
            expert may be returned as ``source_expert_tensor`` itself, without a clone.

    Returns:
        A new tensor (``source_expert_tensor`` itself only when unchanged and ``may_alias``).
    """
    if logical_key not in EXPERT_KEYS:
        raise ValueError(f"not a per-expert logical key: {logical_key!r} (expected one of {EXPERT_KEYS})")
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be finite and >= 0, got {std}")
    src = source_expert_tensor
    full_shape = tuple(src.shape) if full_shape is None else tuple(int(s) for s in full_shape)
    reg = _region(region, len(full_shape))
    if zeroed(plan, target_layer, logical_key):
        return torch.zeros_like(src)
    out = src
    for op in plan.operators:
        out = op.expert_tensor(plan, out, logical_key=logical_key, target_layer=target_layer,
                               target_expert=target_expert, std=std, full_shape=full_shape, region=reg)
    return src.clone() if out is src and not may_alias else out


def grow_router(plan: GrowthPlan, target_layer: int, source_router_EH: torch.Tensor) -> torch.Tensor:
    """Router weight ``[E_src, H] -> [E_tgt, H]``: rows follow ``plan.expert_source[target_layer]``, then each
    operator's ``router`` transform (width: noise on the copy rows).

    Args:
        plan: the growth plan.
        target_layer: the layer index in the grown model.
        source_router_EH: the source layer's router weight.

    Returns:
        A new tensor.
    """
    return _per_expert_rows(plan, target_layer, source_router_EH, "router")


def grow_expert_bias(plan: GrowthPlan, target_layer: int, source_bias_E: torch.Tensor) -> torch.Tensor:
    """Router ``expert_bias`` ``[E_src] -> [E_tgt]``: entries follow ``plan.expert_source[target_layer]``, then each
    operator's ``expert_bias`` transform (width: zero_expert_bias, random new experts, noise).

    Args:
        plan: the growth plan.
        target_layer: the layer index in the grown model.
        source_bias_E: the source layer's expert bias.

    Returns:
        A new tensor.
    """
    return _per_expert_rows(plan, target_layer, source_bias_E, "expert_bias")


def _per_expert_rows(plan: GrowthPlan, target_layer: int, source: torch.Tensor, transform: str) -> torch.Tensor:
    """Rows of ``source`` (one per source expert) gathered through ``plan.expert_source[target_layer]``, then each
    operator's ``transform`` hook (``router`` or ``expert_bias``) in the plan's order."""
    index = torch.tensor(plan.expert_source[target_layer], dtype=torch.long, device=source.device)
    out = source.index_select(0, index).clone()
    for op in plan.operators:
        out = getattr(op, transform)(plan, target_layer, out, source)
    return out
