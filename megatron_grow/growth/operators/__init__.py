"""The registry of growth operators: recipe name -> operator class.

An operator is one file in this folder (``base.GrowthOperator`` subclass) plus one line below;
its recipe section is a ``GrowthConfig`` field marked ``operator=True`` (docs/extending.md).
"""

from __future__ import annotations

from megatron_grow.errors import ConfigError
from megatron_grow.growth.operators.base import GrowthOperator
from megatron_grow.growth.operators.depth import DepthOperator
from megatron_grow.growth.operators.insert import InsertOperator
from megatron_grow.growth.operators.upcycle import UpcycleOperator
from megatron_grow.growth.operators.width import WidthOperator

REGISTRY: dict[str, type[GrowthOperator]] = {op.name: op for op in (
    DepthOperator,
    WidthOperator,
    UpcycleOperator,
    InsertOperator,
)}


def operator_class(name: str) -> type[GrowthOperator]:
    """The operator registered under ``name``.

    Args:
        name: a ``growth.order`` entry.

    Returns:
        Its class.

    Raises:
        ConfigError: no operator is registered under ``name``.
    """
    if name not in REGISTRY:
        raise ConfigError([f"growth.{name}: no growth operator is registered under this name "
                           f"(registered: {', '.join(REGISTRY)}; megatron_grow/growth/operators/__init__.py)"])
    return REGISTRY[name]
