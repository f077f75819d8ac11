"""Prove that loading a checkpoint into a freshly built model filled every tensor.

A model built by Megatron-Core starts from its own random init, so a tensor a load forgot to
fill would look plausible. Growth and HF import therefore NaN-fill every parameter and floating
persistent buffer before the load (:func:`poison_parameters`) and look for NaNs after it
(:func:`verify_all_sourced`): any left is a tensor nothing was read into.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from megatron_grow.errors import GrowthError
from megatron_grow.parallel.collectives import rank


def _persistent_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    for mod_name, mod in module.named_modules():
        for b_name, b in mod._buffers.items():
            if b is not None and b_name not in mod._non_persistent_buffers_set and b.is_floating_point():
                yield f"{mod_name}.{b_name}" if mod_name else b_name, b


@torch.no_grad()
def poison_parameters(model_chunks: Sequence[torch.nn.Module]) -> None:
    """NaN-fill every parameter and persistent buffer, so anything the load misses is detectable.

    Args:
        model_chunks: this rank's model chunks (one per virtual pipeline stage), changed in place.
    """
    for chunk in model_chunks:
        for _, t in _persistent_tensors(chunk):
            t.fill_(float("nan"))


def verify_all_sourced(model_chunks: Sequence[torch.nn.Module]) -> None:
    """Raise if any parameter or persistent buffer still holds a NaN after the load.

    Args:
        model_chunks: the chunks given to :func:`poison_parameters` before the load.

    Raises:
        GrowthError: naming up to five tensors that were not filled from the checkpoint.
    """
    missing = []
    for i, chunk in enumerate(model_chunks):
        for name, t in _persistent_tensors(chunk):
            # no NaN makes the sum NaN, so one reduction clears almost every tensor (an overflow to
            # +inf and -inf together falls through to the exact test)
            if bool(torch.isnan(t.sum())) and bool(torch.isnan(t).any()):
                missing.append(f"chunk {i}: {name}")
    if missing:
        raise GrowthError(f"rank {rank()}: {len(missing)} tensors of the grown model were not sourced from the "
                          f"checkpoint (left at their init): {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else ""))
