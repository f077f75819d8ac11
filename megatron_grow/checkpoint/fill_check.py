"""Prove that loading a checkpoint into a freshly built model filled every tensor.

A model built by Megatron-Core starts from its own random init, so a tensor a load forgot to
fill would look plausible. Growth and HF import therefore NaN-fill every parameter and floating
persistent buffer before the load (:func:`poison_parameters`) and look for NaNs after it
(:func:`verify_all_sourced`): any left is a tensor nothing was read into.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

import torch

from megatron_grow.errors import GrowthError
from megatron_grow.parallel.collectives import rank


def _persistent_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    for mod_name, mod in module.named_modules():
        for b_name, b in mod._buffers.items():
            if b is not None and b_name not in mod._non_persistent_buffers_set and b.is_floating_point():
                yield f"{mod_name}.{b_name}" if mod_name else b_name, b


def _covered_ranges(views: Iterable[torch.Tensor]) -> dict[int, list[tuple[int, int]]]:
    """Per storage, the merged byte ranges of the contiguous ``views`` (a strided view proves nothing)."""
    ranges: dict[int, list[tuple[int, int]]] = {}
    for v in views:
        if v.is_contiguous() and v.numel():
            ranges.setdefault(v.untyped_storage().data_ptr(), []).append((v.data_ptr(), v.data_ptr() + v.nbytes))
    for key, spans in ranges.items():
        merged: list[tuple[int, int]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        ranges[key] = merged
    return ranges


def _is_covered(t: torch.Tensor, ranges: dict[int, list[tuple[int, int]]]) -> bool:
    if not t.is_contiguous():
        return False
    a, b = t.data_ptr(), t.data_ptr() + t.nbytes
    spans = ranges.get(t.untyped_storage().data_ptr(), ())
    i = bisect.bisect_right(spans, (a, float("inf"))) - 1
    return i >= 0 and spans[i][0] <= a and b <= spans[i][1]


@torch.no_grad()
def poison_parameters(model_chunks: Sequence[torch.nn.Module],
                      written_in_full: Iterable[torch.Tensor] = ()) -> list[tuple[int, str, torch.Tensor]]:
    """NaN-fill every parameter and persistent buffer, so anything the load misses is detectable.

    Args:
        model_chunks: this rank's model chunks (one per virtual pipeline stage), changed in place.
        written_in_full: views the caller will write completely (each a whole region, e.g. the
            ``ShardedTensor.data`` an import copies into): a tensor inside them needs no NaN proof,
            which spares a fill and a scan of every byte.

    Returns:
        ``(chunk index, name, tensor)`` of what was NaN-filled, for :func:`verify_all_sourced`.
    """
    ranges = _covered_ranges(written_in_full)
    poisoned = []
    for i, chunk in enumerate(model_chunks):
        for name, t in _persistent_tensors(chunk):
            if not _is_covered(t, ranges):
                t.fill_(float("nan"))
                poisoned.append((i, name, t))
    return poisoned


def verify_all_sourced(model_chunks: Sequence[torch.nn.Module],
                       poisoned: Sequence[tuple[int, str, torch.Tensor]] | None = None) -> None:
    """Raise if any parameter or persistent buffer still holds a NaN after the load.

    Args:
        model_chunks: the chunks given to :func:`poison_parameters` before the load.
        poisoned: what :func:`poison_parameters` returned (default: every tensor of ``model_chunks``).

    Raises:
        GrowthError: naming up to five tensors that were not filled from the checkpoint.
    """
    if poisoned is None:
        poisoned = [(i, name, t) for i, chunk in enumerate(model_chunks) for name, t in _persistent_tensors(chunk)]
    missing = []
    for i, name, t in poisoned:
        # no NaN makes the sum NaN, so one reduction clears almost every tensor (an overflow to
        # +inf and -inf together falls through to the exact test)
        if bool(torch.isnan(t.sum())) and bool(torch.isnan(t).any()):
            missing.append(f"chunk {i}: {name}")
    if missing:
        raise GrowthError(f"rank {rank()}: {len(missing)} tensors of the grown model were not sourced from the "
                          f"checkpoint (left at their init): {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else ""))
