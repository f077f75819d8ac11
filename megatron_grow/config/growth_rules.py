"""Growth rules: which operators exist, when a growth section is valid, and what the grown model is.

Pure arithmetic over the config dataclasses (no torch, no index maps): the recipe checks
(``config.check``), ``plan`` and the growth engine (``growth.plan``, which adds the per-layer
and per-expert index maps) all ask these functions, so a bound is checked in one place. Nothing
here names an operator: each section (a ``GrowthSection``) answers for itself, applied in the
recipe's ``growth.order``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_grow.config.schema import GrowthConfig, ModelConfig, OptimizerCarry, ParamKind, field_problem, values

OPERATORS = GrowthConfig.operator_names()


def grown_model(source: ModelConfig, growth: GrowthConfig | None) -> ModelConfig:
    """The architecture a growth produces from ``source`` (``source`` itself without growth).

    Args:
        source: the model the growth starts from.
        growth: the recipe's growth section, or None.

    Returns:
        ``source`` grown by each operator in ``resolved_order(growth)``.
    """
    if growth is None:
        return source
    model = source
    for name in resolved_order(growth):
        model = getattr(growth, name).grown_model(model)
    return model


def resolved_order(growth: GrowthConfig) -> tuple[str, ...]:
    """The explicit order, or the default order (``OPERATORS``) over the non-null sections when left empty."""
    if growth.order:
        return tuple(growth.order)
    return tuple(growth.sections())


def bounds_problems(obj: Any, prefix: str) -> list[str]:
    """The schema's metadata checks, re-run for dataclasses built in code (not loaded from YAML)."""
    fields = dataclasses.fields(obj)
    found = (field_problem(getattr(obj, f.name), f.metadata, f"{prefix}.{f.name}") for f in fields)
    return [p for p in found if p]


def _order_problems(growth: GrowthConfig, prefix: str) -> list[str]:
    active = list(growth.sections())
    if not active:
        return [f"{prefix}: at least one of {' and '.join(f'{prefix}.{name}' for name in OPERATORS)} must be set"]
    order = tuple(growth.order)
    unknown = [o for o in order if o not in OPERATORS]
    if unknown:
        return [f"{prefix}.order: unknown operator(s) {unknown}; allowed: {', '.join(OPERATORS)}"]
    if len(set(order)) != len(order):
        return [f"{prefix}.order: {list(order)} names an operator more than once"]
    if order and set(order) != set(active):
        return [f"{prefix}.order: {list(order)} must name exactly the non-null sections {active}"]
    return []


def _source_problems(growth: GrowthConfig, model: ModelConfig, prefix: str, order: tuple[str, ...]) -> list[str]:
    """Each operator's problems against the model it is applied to (the source grown by those before it)."""
    out, source = [], model
    for name in order:
        section = getattr(growth, name)
        out.extend(section.problems(model, f"{prefix}.{name}"))
        out.extend(section.source_problems(source, f"{prefix}.{name}"))
        model = section.grown_model(model)
    return out


def _policy_problems(growth: GrowthConfig, prefix: str) -> list[str]:
    """``optimizer_policy`` goes with ``optimizer: policy`` and only with it; its rules' bounds."""
    policy, wants = growth.optimizer_policy, growth.optimizer == OptimizerCarry.POLICY
    if wants and policy is None:
        return [f"{prefix}.optimizer: policy needs a {prefix}.optimizer_policy section"]
    if policy is not None and not wants:
        return [f"{prefix}.optimizer_policy is set but {prefix}.optimizer is {growth.optimizer!r}; "
                f"set {prefix}.optimizer: policy or remove the section"]
    if policy is None:
        return []
    out = []
    for member in ("originals", "copies"):
        out.extend(bounds_problems(getattr(policy, member), f"{prefix}.optimizer_policy.{member}"))
    for kind in values(ParamKind):
        by_kind = getattr(policy, kind)
        for member in ("originals", "copies"):
            rule = getattr(by_kind, member) if by_kind is not None else None
            if rule is not None:
                out.extend(bounds_problems(rule, f"{prefix}.optimizer_policy.{kind}.{member}"))
    return out


def growth_problems(growth: GrowthConfig, model: ModelConfig | None = None,
                    prefix: str = "growth") -> list[str]:
    """Every problem of ``growth`` (against ``model`` when given), one line each naming its key.

    Args:
        growth: the growth section to check.
        model: the source model, or None to check the section alone.
        prefix: the section's key path in messages.

    Returns:
        The problems; empty when ``growth`` is valid.
    """
    out = bounds_problems(growth, prefix)
    for name, section in growth.sections().items():
        out.extend(bounds_problems(section, f"{prefix}.{name}"))
    order_problems = _order_problems(growth, prefix)
    out.extend(order_problems)
    out.extend(_policy_problems(growth, prefix))
    if model is not None:
        # With a bad order the sections are still checked, in the default order.
        order = tuple(growth.sections()) if order_problems else resolved_order(growth)
        out.extend(_source_problems(growth, model, prefix, order))
    return out
