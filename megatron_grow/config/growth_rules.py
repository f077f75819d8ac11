"""Growth rules: which operators exist, when a growth section is valid, and what the grown model is.

Pure arithmetic over the config dataclasses (no torch, no index maps): the recipe checks
(``config.check``), ``plan`` and the growth engine (``growth.plan``, which adds the per-layer
and per-expert index maps) all ask these functions, so a bound is checked in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_grow.config.schema import GrowthConfig, ModelConfig, field_problem

OPERATORS = ("depth", "width")


def grown_depth(num_layers: int, factor: int, ignore_first: int = 0, ignore_last: int = 0) -> int:
    """Target depth ``k*L - (k-1)*(first+last)``: the ignored layers appear once, the rest k times."""
    return factor * num_layers - (factor - 1) * (ignore_first + ignore_last)


def topk_factor(growth: GrowthConfig) -> int:
    """How much width growth multiplies top-k (1 without width growth; ``factor`` unless set)."""
    w = growth.width
    if w is None:
        return 1
    return w.topk_factor if w.topk_factor is not None else w.factor


def grown_model(source: ModelConfig, growth: GrowthConfig | None) -> ModelConfig:
    """The architecture a growth produces from ``source`` (``source`` itself without growth)."""
    if growth is None:
        return source
    d, w = growth.depth, growth.width
    layers = grown_depth(source.num_layers, d.factor, d.ignore_first, d.ignore_last) if d else source.num_layers
    experts = source.num_moe_experts * (w.factor if w else 1)
    return dataclasses.replace(source, num_layers=layers, num_moe_experts=experts,
                               moe_router_topk=source.moe_router_topk * topk_factor(growth))


def resolved_order(growth: GrowthConfig) -> tuple[str, ...]:
    """The explicit order, or depth-then-width over the non-null sections when left empty."""
    if growth.order:
        return tuple(growth.order)
    return tuple(name for name in OPERATORS if getattr(growth, name) is not None)


def bounds_problems(obj: Any, prefix: str) -> list[str]:
    """The schema's metadata checks, re-run for dataclasses built in code (not loaded from YAML)."""
    fields = dataclasses.fields(obj)
    found = (field_problem(getattr(obj, f.name), f.metadata, f"{prefix}.{f.name}") for f in fields)
    return [p for p in found if p]


def _order_problems(growth: GrowthConfig, prefix: str) -> list[str]:
    active = [name for name in OPERATORS if getattr(growth, name) is not None]
    if not active:
        return [f"{prefix}: at least one of {prefix}.depth and {prefix}.width must be set"]
    order = tuple(growth.order)
    unknown = [o for o in order if o not in OPERATORS]
    if unknown:
        return [f"{prefix}.order: unknown operator(s) {unknown}; allowed: {', '.join(OPERATORS)}"]
    if len(set(order)) != len(order):
        return [f"{prefix}.order: {list(order)} names an operator more than once"]
    if order and set(order) != set(active):
        return [f"{prefix}.order: {list(order)} must name exactly the non-null sections {active}"]
    return []


def _source_problems(growth: GrowthConfig, model: ModelConfig, prefix: str) -> list[str]:
    out = []
    d, w = growth.depth, growth.width
    if d is not None and d.ignore_first + d.ignore_last >= model.num_layers:
        out.append(f"{prefix}.depth.ignore_first + {prefix}.depth.ignore_last ({d.ignore_first} + "
                   f"{d.ignore_last}) must be < the source model's num_layers ({model.num_layers})")
    if w is not None:
        tf = topk_factor(growth)
        if model.moe_router_topk * tf > model.num_moe_experts * w.factor:
            out.append(f"{prefix}.width.topk_factor ({tf}): grown top-k {model.moe_router_topk * tf} "
                       f"exceeds grown experts {model.num_moe_experts * w.factor}")
    return out


def growth_problems(growth: GrowthConfig, model: ModelConfig | None = None,
                    prefix: str = "growth") -> list[str]:
    """Every problem of ``growth`` (against ``model`` when given), one line each naming its key."""
    out = bounds_problems(growth, prefix)
    for name in OPERATORS:
        section = getattr(growth, name)
        if section is not None:
            out.extend(bounds_problems(section, f"{prefix}.{name}"))
    out.extend(_order_problems(growth, prefix))
    if model is not None:
        out.extend(_source_problems(growth, model, prefix))
    return out
