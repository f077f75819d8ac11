"""``growth.rehearsal.tiling_problems``: the rehearsal's check that a checkpoint's chunks tile each
tensor exactly once (no gap, no overlap, nothing outside), on hand-built DCP metadata."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_grow.growth.rehearsal import tiling_problems


def metadata(size: tuple, chunks: list[tuple[tuple, tuple]]) -> Metadata:
    md = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(size),
                               [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks])
    return Metadata(state_dict_metadata={"w": md})


def test_an_exact_tiling_passes():
    # A 4 x 6 tensor in uneven pieces: rows 0-1 split at column 2, rows 2-3 whole.
    assert tiling_problems(metadata((4, 6), [((0, 0), (2, 2)), ((0, 2), (2, 4)), ((2, 0), (2, 6))])) == []


def test_a_gap_is_found():
    (problem,) = tiling_problems(metadata((4, 6), [((0, 0), (2, 2)), ((2, 0), (2, 6))]))
    assert problem.startswith("w:") and "covered" in problem


def test_an_overlap_is_found():
    (problem,) = tiling_problems(metadata((4, 6), [((0, 0), (4, 6)), ((2, 0), (2, 6))]))
    assert "twice" in problem and not problem.endswith(" 0 twice")


def test_a_chunk_outside_is_found():
    (problem,) = tiling_problems(metadata((4, 6), [((0, 0), (4, 6)), ((4, 0), (1, 6))]))
    assert "outside" in problem
