"""Progress lines, one logger for the whole package: printed once (by rank 0), flushed, prefixed
by the component that speaks (``[grow] ...``, ``[train] ...``, ``[demo] ...``).

Built on :func:`megatron_grow.parallel.collectives.print_rank0`, so several ranks sharing one log
under torchrun print each line once, and a plain process (no process group) is rank 0.

    from megatron_grow.log import component_log

    log = component_log("grow")
    log("loaded the source")        # -> "[grow] loaded the source"
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_grow.parallel.collectives import print_rank0


def component_log(component: str) -> Callable[[str], None]:
    """The logging function of one component.

    Args:
        component: the short name printed in brackets before every line (``grow``, ``train``).

    Returns:
        ``log(message)``: prints ``[component] message`` on rank 0 only, flushed.
    """
    prefix = f"[{component}] "

    def log(message: str) -> None:
        print_rank0(message, prefix=prefix)

    return log
