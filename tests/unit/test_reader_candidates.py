"""Which stored chunks a region read is matched against (``CheckpointReader._candidates``): a layer's
experts each stored as their own chunk are narrowed by the expert axis too, and chunks that are not on
a grid still read whole (the reader falls back to every chunk). Expected chunks are listed by hand."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_grow.growth.rehearsal import MetadataReader

KEY = "decoder.layers.mlp.experts.experts.linear_fc2.weight"


def _reader(chunks: list[tuple[tuple, tuple]], size: tuple) -> MetadataReader:
    md = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(size),
                               [ChunkStorageMetadata(torch.Size(o), torch.Size(n)) for o, n in chunks])
    return MetadataReader(Metadata(state_dict_metadata={KEY: md}))


def _starts(reader, offsets, sizes) -> set:
    return {tuple(c.offsets) for c in reader._candidates(KEY, offsets, sizes).chunks}


def test_expert_chunks_are_narrowed_by_the_expert_axis():
    # [2 layers, 8 experts, 4, 4]: one chunk per (layer, expert) and half of dim 2 (expert TP=2).
    chunks = [((layer, e, half * 2, 0), (1, 1, 2, 4)) for layer in range(2) for e in range(8) for half in range(2)]
    reader = _reader(chunks, (2, 8, 4, 4))
    assert _starts(reader, (1, 3, 0, 0), (1, 3, 4, 4)) == {(1, e, h, 0) for e in (3, 4, 5) for h in (0, 2)}
    assert _starts(reader, (0, 7, 2, 0), (1, 1, 2, 4)) == {(0, 7, 0, 0), (0, 7, 2, 0)}
    assert reader.read(KEY, (1, 3, 0, 0), (1, 3, 4, 4)).shape == (1, 3, 4, 4)  # covered exactly


def test_chunks_off_a_grid_still_read_whole():
    # Layer 0 of [1, 4, 4]: A = experts 0-3 x cols 0-1, B = experts 0-1 x cols 2-3, C = experts 2-3 x cols 2-3.
    chunks = [((0, 0, 0), (1, 4, 2)), ((0, 0, 2), (1, 2, 2)), ((0, 2, 2), (1, 2, 2))]
    reader = _reader(chunks, (1, 4, 4))
    assert (0, 0, 0) not in _starts(reader, (0, 3, 0), (1, 1, 4))  # the narrowing misses A ...
    assert reader.read(KEY, (0, 3, 0), (1, 1, 4)).shape == (1, 1, 4)  # ... and the read falls back to all
    assert reader.bytes_read == 1 * 1 * 4 * 4  # the region, fp32
