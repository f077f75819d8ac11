"""A stored chunk read whole has its page cache released (POSIX_FADV_DONTNEED on exactly its bytes);
a chunk read in part keeps it. The checkpoint is written by torch DCP's own save, and the expected
byte ranges come from DCP's own metadata."""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from torch.distributed.checkpoint import FileSystemReader

from megatron_grow.checkpoint.reader import CheckpointReader


@pytest.fixture
def saved(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 32, generator=generator), "b": torch.randn(7, generator=generator).bfloat16()}
    iteration_dir = tmp_path / "iter_0000001"  # Megatron-LM's layout around torch DCP's own files
    dcp.save(state, checkpoint_id=iteration_dir, no_dist=True)
    save_config(CheckpointingConfig("torch_dist", 1), str(iteration_dir))  # Megatron-Core's metadata.json
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    return iteration_dir, state, FileSystemReader(iteration_dir).read_metadata().storage_data


@pytest.fixture
def advice(monkeypatch):
    calls = []
    real = os.posix_fadvise

    def recording(fd, offset, length, what):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, what))
        return real(fd, offset, length, what)

    monkeypatch.setattr(os, "posix_fadvise", recording)
    return calls


def _stored_span(storage_data, fqn):
    (info,) = [info for index, info in storage_data.items() if index.fqn == fqn]
    return info.relative_path, info.offset, info.length


def test_a_chunk_read_whole_releases_exactly_its_bytes(saved, advice):
    root, state, storage_data = saved
    reader = CheckpointReader(str(root))
    assert torch.equal(reader.read("w"), state["w"])
    assert torch.equal(reader.read("b"), state["b"])
    expected = []
    for fqn in ("w", "b"):
        relative_path, offset, length = _stored_span(storage_data, fqn)
        expected.append((os.path.realpath(root / relative_path), offset, length, os.POSIX_FADV_DONTNEED))
    assert advice == expected


def test_a_chunk_read_in_part_keeps_its_pages(saved, advice):
    root, state, _ = saved
    reader = CheckpointReader(str(root))
    assert torch.equal(reader.read("w", (8, 0), (16, 32)), state["w"][8:24])
    assert torch.equal(reader.read("w", (0, 4), (64, 8)), state["w"][:, 4:12])
    assert advice == []


def test_reads_work_where_the_platform_has_no_fadvise(saved, monkeypatch):
    root, state, _ = saved
    monkeypatch.delattr(os, "posix_fadvise")
    assert torch.equal(CheckpointReader(str(root)).read("w"), state["w"])
