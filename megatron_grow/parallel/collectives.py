"""Rank queries and the few collectives the library uses, valid with or without torch.distributed.

Without a process group every call answers as the only rank of a world of one, so library
code (checkpoint I/O, growth, training) runs unchanged in one plain process.
"""

from __future__ import annotations

from typing import Any

import torch


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity without torch.distributed)."""
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_host(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce a CPU tensor in place (counters, flags, losses). NCCL takes CUDA tensors only,
    so under NCCL the values travel through the current GPU and come back."""
    op = torch.distributed.ReduceOp.SUM if op is None else op
    if torch.distributed.get_backend() == "nccl":
        staged = tensor.cuda()
        torch.distributed.all_reduce(staged, op=op)
        tensor.copy_(staged.cpu())
    else:
        torch.distributed.all_reduce(tensor, op=op)
    return tensor


def print_rank0(message: str, prefix: str = "") -> None:
    """Progress lines: printed once, by rank 0, flushed (several ranks share one log under torchrun)."""
    if is_rank0():
        print(f"{prefix}{message}", flush=True)
