"""One rank of a layout of any size, simulated in this process: torch's fake process group.

The growth rehearsal (``growth.rehearsal``) and the training-side memory check run the real
Megatron-Core parallel state of rank ``r`` of a ``world``-rank layout without launching it:
``torch.distributed`` is initialised with torch's ``fake`` backend (every collective returns at
once and moves no data), then ``parallel_state.initialize_model_parallel`` builds the real
tensor/pipeline/expert/data groups of that rank. Nothing that depends on another rank's *data*
may run under it (a collective's result is whatever the caller's buffer held).

Ranks are simulated one after the other (destroy, re-initialise), in one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core import parallel_state as ps
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_grow.config.layout_rules import Layout, resolve_layout, world_layout_problems
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.errors import LayoutError
from megatron_grow.parallel.init import initialize_model_parallel


@contextlib.contextmanager
def simulated_rank(parallel: ParallelConfig, rank: int, world_size: int) -> Iterator[Layout]:
    """Inside: this process is rank ``rank`` of ``world_size`` under ``parallel`` (fake collectives)."""
    problems = world_layout_problems(parallel, world_size)
    if problems:
        raise LayoutError("; ".join(problems))
    if torch.distributed.is_initialized():
        raise RuntimeError("simulated_rank needs a process without torch.distributed initialised")
    layout = resolve_layout(parallel, world_size)
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        initialize_model_parallel(layout, create_gloo_process_groups=False)  # gloo groups need a rendezvous
        yield layout
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()
