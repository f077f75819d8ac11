"""Process groups: the only place that initialises torch.distributed and MCore parallel state.

Backend: NCCL with CUDA, gloo without (CPU mode, see ``megatron_grow.platform.cpu``).
Works under torchrun (env:// rendezvous) and as a single process with no launcher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from torch.distributed import distributed_c10d as c10d

from megatron_grow.config.layout_rules import Layout, resolve_layout, world_layout_problems
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.errors import LayoutError
from megatron_grow.parallel.ports import free_port
from megatron_grow.platform import cpu


@dataclass(frozen=True)
class DistributedContext:
    """What a component needs to know about where it runs."""

    rank: int
    world_size: int
    local_rank: int
    layout: Layout
    device: torch.device


def initialize_model_parallel(layout: Layout, **options) -> None:
    """Megatron-Core's parallel state for ``layout`` (its process groups over the current world).

    Args:
        layout: the resolved layout (``config.layout_rules.resolve_layout``).
        options: further ``parallel_state.initialize_model_parallel`` arguments.
    """
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        **options,
    )


def _init_process_group(backend: str, timeout: timedelta, use_cuda: bool) -> None:
    """The default process group: torchrun's rendezvous (``MASTER_ADDR``/``MASTER_PORT``), or, for a
    process started alone, a one-process world on an in-process store. The lone world binds no port:
    a port picked free and bound a moment later can be taken in between (``EADDRINUSE``)."""
    alone = "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1"
    # The usual variables either way: libraries run later in this process (lm-eval's accelerate) read them.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if alone:
        torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(), rank=0,
                                             world_size=1, timeout=timeout)
    else:
        torch.distributed.init_process_group(backend=backend, timeout=timeout)


def initialize_distributed(parallel: ParallelConfig, seed: int = 1234,
                           timeout_minutes: int = 30) -> DistributedContext:
    """Start torch.distributed (if needed) and MCore model-parallel groups for ``parallel``."""
    use_cuda = torch.cuda.is_available()
    if not use_cuda and not cpu.cpu_mode_active():
        raise RuntimeError("no CUDA device and CPU mode is not installed: call "
                           "megatron_grow.platform.cpu.apply_cpu_adaptations() at the entry point first")
    if not torch.distributed.is_initialized():
        _init_process_group("nccl" if use_cuda else "gloo", timedelta(minutes=timeout_minutes), use_cuda)
    world = torch.distributed.get_world_size()
    problems = world_layout_problems(parallel, world)
    if problems:
        raise LayoutError("; ".join(problems))
    layout = resolve_layout(parallel, world)
    if ps.model_parallel_is_initialized():
        destroy_model_parallel_groups()
    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return DistributedContext(torch.distributed.get_rank(), world, local_rank, layout, device)


def destroy_model_parallel_groups() -> None:
    """Megatron-Core's parallel state and the process groups behind it, so that a process that initialises
    again (repro's workers, in-process tests) does not keep every earlier run's gloo groups: each holds
    threads that stay alive and polling (1,100 threads in one repro worker before this)."""
    world = torch.distributed.group.WORLD
    # torch has no public list of groups; its c10d registry is the one place every subgroup is held.
    for group in list(c10d._world.pg_map):
        if group is not world:
            torch.distributed.destroy_process_group(group)
    ps.destroy_model_parallel()


def destroy_distributed() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
