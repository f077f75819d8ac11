"""Checkpoint files written past the page cache (``O_DIRECT``), byte for byte what a plain write gives.

A grown checkpoint is written once and not read back by the process that writes it, so the page
cache only costs: every written byte first takes a page-cache page, and on a machine whose free
memory is not already backed (a VM that hands pages over on first touch, a node whose memory holds
the source checkpoint) taking those pages is the slow part of the write. Measured on the 2-core
development VM, 4 GiB from one reused 16 MiB buffer: 0.09-0.10 GB/s through the page cache,
1.43-1.48 GB/s with ``O_DIRECT`` (``docs/benchmarks.md``).

:class:`DirectWriteStream` collects what it is given in one page-aligned staging buffer, writes the
buffer whole with ``O_DIRECT``, pads the last block and truncates the file to its true length on
close. A filesystem that refuses ``O_DIRECT`` at open or at the first write gets the same bytes
through a plain write. :class:`DirectFileSystem` hands torch DCP's ``FileSystemWriter`` such a
stream for every file it writes, so the files are exactly what torch writes without it
(``tests/unit/test_direct_io.py``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import mmap
import os

from torch.distributed.checkpoint.filesystem import FileSystem

#: Offsets and lengths of ``O_DIRECT`` writes are multiples of this (a page, which covers the 512-byte
#: and 4 KiB logical blocks of common devices).
ALIGNMENT = 4096
#: One staging buffer per open file; large enough that each write keeps the device busy.
STAGING_BYTES = 16 << 20

#: Whether :class:`DirectFileSystem` writes with ``O_DIRECT`` (False: plain writes, same bytes).
#: ``MEGATRON_GROW_DIRECT_IO=0`` turns it off for every writer of a process.
ENABLED = os.environ.get("MEGATRON_GROW_DIRECT_IO", "1") != "0"


def _open_for_write(path: str, direct: bool) -> tuple[int, bool]:
    """Open ``path`` for writing (created or truncated); returns the descriptor and whether it is direct."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    o_direct = getattr(os, "O_DIRECT", 0)
    if direct and o_direct:
        try:
            return os.open(path, flags | o_direct, 0o644), True
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return os.open(path, flags, 0o644), False


class DirectWriteStream(io.RawIOBase):
    """A write-only file stream that writes with ``O_DIRECT`` where the filesystem allows it.

    ``tell()`` counts the bytes given so far; ``flush()`` keeps a partly filled staging buffer (only
    whole buffers, and the padded tail on ``close()``, reach the file); ``fileno()`` is the file's
    descriptor, for ``fsync``.
    """

    def __init__(self, path: str, direct: bool = True, staging_bytes: int = STAGING_BYTES):
        super().__init__()
        if staging_bytes <= 0 or staging_bytes % ALIGNMENT:
            raise ValueError(f"staging_bytes must be a positive multiple of {ALIGNMENT}, got {staging_bytes}")
        self._fd, self.direct = _open_for_write(os.fspath(path), direct)
        self._staging = mmap.mmap(-1, staging_bytes)  # anonymous maps are page-aligned, as O_DIRECT needs
        self._view = memoryview(self._staging)
        self._filled = 0  # bytes waiting in the staging buffer
        self._flushed = 0  # bytes already in the file

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self._flushed + self._filled

    def flush(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("write to closed file")
        with memoryview(data) as given, given.cast("B") as source:
            total, done, room = len(source), 0, len(self._view)
            while done < total:
                take = min(total - done, room - self._filled)
                self._view[self._filled:self._filled + take] = source[done:done + take]
                self._filled += take
                done += take
                if self._filled == room:
                    self._write_out(self._filled)
                    self._flushed += self._filled
                    self._filled = 0
        return total

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._filled:
                length = self._flushed + self._filled
                padded = self._filled
                if self.direct:  # a direct write is whole blocks: pad, then cut the file to its length
                    padded = -(-self._filled // ALIGNMENT) * ALIGNMENT
                    self._view[self._filled:padded] = bytes(padded - self._filled)
                self._write_out(padded)
                if padded != self._filled:
                    os.ftruncate(self._fd, length)
                self._flushed, self._filled = length, 0
        finally:
            self._view.release()
            self._staging.close()
            os.close(self._fd)
            super().close()

    def _write_out(self, nbytes: int) -> None:
        """Write the first ``nbytes`` of the staging buffer at the file's position, all of them."""
        done = 0
        while done < nbytes:
            try:
                with self._view[done:nbytes] as chunk:  # released even when the write fails
                    done += os.write(self._fd, chunk)
            except OSError as e:
                # A filesystem that opens with O_DIRECT but will not write that way (or wants larger
                # blocks): the same bytes go through the page cache from here on.
                if not self.direct or e.errno != errno.EINVAL:
                    raise
                self._stop_direct()
                continue
            if self.direct and done % ALIGNMENT:  # a short direct write leaves an unaligned offset
                self._stop_direct()

    def _stop_direct(self) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~getattr(os, "O_DIRECT", 0))
        self.direct = False


class DirectFileSystem(FileSystem):
    """torch DCP's local filesystem whose files are written by :class:`DirectWriteStream` (reads unchanged)."""

    def __init__(self, direct: bool | None = None):
        super().__init__()
        self.direct = ENABLED if direct is None else direct

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stream = DirectWriteStream(path, direct=self.direct)
        try:
            yield stream
        finally:
            stream.close()
