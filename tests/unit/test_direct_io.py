"""Files written past the page cache hold exactly the bytes a plain write gives (checkpoint.direct_io)."""

import errno
import fcntl
import os
import random

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from megatron_grow.checkpoint import direct_io
from megatron_grow.checkpoint.direct_io import ALIGNMENT, DirectFileSystem, DirectWriteStream

STAGING = 2 * ALIGNMENT  # small, so a few bytes cross several staging buffers


def _pieces(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [0, 1, ALIGNMENT - 1, ALIGNMENT, ALIGNMENT + 1, STAGING, 3 * STAGING + 17, 5, 2 * STAGING]
    rng.shuffle(sizes)
    return [rng.randbytes(n) for n in sizes]


@pytest.mark.parametrize("direct", [True, False])
def test_the_file_holds_the_bytes_given_and_tell_counts_them(tmp_path, direct):
    pieces = _pieces(0)
    path = tmp_path / "f"
    stream = DirectWriteStream(path, direct=direct, staging_bytes=STAGING)
    given = 0
    for piece in pieces:
        assert stream.write(piece) == len(piece)
        given += len(piece)
        assert stream.tell() == given
        stream.flush()  # DCP flushes after every item: the tail must not be written early
    stream.close()
    stream.close()  # closing twice is harmless
    assert path.read_bytes() == b"".join(pieces)
    assert given % ALIGNMENT  # the tail was padded, then cut back


def test_o_direct_is_used_where_the_filesystem_allows_it(tmp_path):
    with DirectWriteStream(tmp_path / "f") as stream:
        assert stream.direct
        assert fcntl.fcntl(stream.fileno(), fcntl.F_GETFL) & os.O_DIRECT
        stream.write(b"x" * (direct_io.STAGING_BYTES + 3))  # one whole direct write, then a padded tail
    assert (tmp_path / "f").read_bytes() == b"x" * (direct_io.STAGING_BYTES + 3)


def test_memoryviews_of_any_format_are_written_as_their_bytes(tmp_path):
    values = torch.arange(1000, dtype=torch.float32)
    with DirectWriteStream(tmp_path / "f", staging_bytes=STAGING) as stream:
        stream.write(memoryview(values.numpy()))
    assert (tmp_path / "f").read_bytes() == values.numpy().tobytes()


def test_a_filesystem_refusing_o_direct_at_open_gets_plain_writes(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", refusing_open)
    pieces = _pieces(1)
    with DirectWriteStream(tmp_path / "f", staging_bytes=STAGING) as stream:
        assert not stream.direct
        for piece in pieces:
            stream.write(piece)
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


def test_a_filesystem_refusing_the_first_direct_write_gets_the_same_bytes(tmp_path, monkeypatch):
    real_write = os.write
    refused = []

    def refusing_write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing_write)
    pieces = _pieces(2)
    with DirectWriteStream(tmp_path / "f", staging_bytes=STAGING) as stream:
        assert stream.direct
        for piece in pieces:
            stream.write(piece)
        assert not stream.direct and refused == [STAGING]
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


def test_other_errors_are_not_swallowed(tmp_path, monkeypatch):
    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    stream = DirectWriteStream(tmp_path / "f", staging_bytes=STAGING)
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError) as caught:
        stream.write(b"y" * STAGING)
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        stream.close()  # the tail cannot be written either; the descriptor is closed all the same
    assert stream.closed
    with pytest.raises(ValueError):
        stream.write(b"z")


def test_a_dcp_save_through_it_writes_the_files_torch_writes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(333, 77, generator=generator), "b": torch.randn(5, generator=generator).bfloat16(),
             "big": torch.randn(3 * 1024 * 1024 + 11, generator=generator), "step": torch.tensor(7)}
    plain, direct = tmp_path / "plain", tmp_path / "direct"
    dcp.save(state, storage_writer=FileSystemWriter(plain, thread_count=2), no_dist=True)
    writer = FileSystemWriter(direct, thread_count=2)
    writer.fs = DirectFileSystem(direct=True)
    dcp.save(state, storage_writer=writer, no_dist=True)
    names = sorted(os.listdir(plain))
    assert names == sorted(os.listdir(direct)) and len(names) >= 3
    for name in names:
        if name != ".metadata":  # the metadata also names the directory and a save id
            assert (plain / name).read_bytes() == (direct / name).read_bytes(), name
    plain_meta, direct_meta = FileSystemReader(plain).read_metadata(), FileSystemReader(direct).read_metadata()
    assert plain_meta.state_dict_metadata == direct_meta.state_dict_metadata
    assert plain_meta.storage_data == direct_meta.storage_data
    loaded = {k: torch.empty_like(v) for k, v in state.items()}
    dcp.load(loaded, checkpoint_id=direct, no_dist=True)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
