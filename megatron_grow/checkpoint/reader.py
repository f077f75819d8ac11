"""Read tensors, or rectangular parts of them, from a ``torch_dist`` checkpoint in one plain process.

The analysis tools (``inspect --stats``, ``weight-norms``) must work on checkpoints far larger
than the machine they run on, without building the model and without torch.distributed. This
module talks to ``torch.distributed.checkpoint`` directly:

* the ``.metadata`` file (read once) lists every stored tensor with its global shape, dtype and
  the chunks (shards) it was saved as;
* :meth:`CheckpointReader.read` asks for one region (offsets + sizes in the global tensor) and
  lets DCP's own resharding helper (``create_read_items_for_chunk_list``) work out which stored
  chunks overlap it; ``FileSystemReader.read_data`` then copies those overlaps into a buffer of
  the region's shape.

Why not Megatron-Core's loader: with a 1-rank gloo group it cannot read part of a tensor (its
torch ShardedTensor conversion needs the shard grid to cover the tensor), and it needs
torch.distributed. Why not ``dcp.load`` with a full-shape tensor: that reads whole stacked
tensors (``[L, E, 2F, H]`` is a third of an MoE).

Memory: ``FileSystemReader`` deserialises each stored chunk that overlaps the request whole and
then narrows it, so the peak is the request buffer plus one stored chunk. Megatron-Core stores
per-layer tensors one chunk per layer (and per expert, and per TP/EP shard), so a request for
one layer, or one expert of one layer, holds at most that much. :meth:`iter_slabs` splits a
tensor along its leading dims into requests of at most ``max_bytes``.

On-disk format assumed: Megatron-Core ``torch_dist`` (``metadata.json`` with
``sharded_backend: torch_dist``, ``.metadata`` + ``__R_I.distcp`` files). Storage keys of
per-layer tensors are stacked over layers (``decoder.layers.mlp.experts.experts.linear_fc1.weight``
is ``[L, E, 2F, H]``).
"""

from __future__ import annotations

import bisect
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_grow.checkpoint import io, paths
from megatron_grow.checkpoint.integrity import damaged_checkpoint_error
from megatron_grow.errors import CheckpointError

DEFAULT_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as the checkpoint's metadata describes it."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    num_chunks: int

    @property
    def numel(self) -> int:
        """The number of elements of the whole (global) tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """The size of the whole (global) tensor in bytes."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class _RegionPlanner:
    """The two planner hooks ``FileSystemReader.read_data`` calls, writing into one buffer.

    DCP's ``ReadItem.dest_offsets`` are relative to the requested chunk, i.e. to ``buffer``.
    """

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer

    def resolve_tensor(self, read_item) -> torch.Tensor:
        return _narrow(self.buffer, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"{read_item.dest_index.fqn} is stored as bytes, not as a tensor")


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        if start != 0 or length != tensor.size(dim):
            tensor = tensor.narrow(dim, start, length)
    return tensor


class CheckpointReader:
    """Tensor-by-tensor (or region-by-region) reads from one ``iter_N`` directory.

    ``path`` may be a run root (the tracker picks the iteration) or an ``iter_N`` directory.
    ``progress``: a callable taking a message, called on long reads (see :meth:`iter_slabs`).
    Reads are local to the calling process (no collectives) and may run in several threads.
    """

    buffer_device = "cpu"  # where read regions are allocated ("meta" in the growth rehearsal: no data)
    bytes_received = 0  # source bytes another rank read and sent to this one (growth.source_reads)
    _count_lock = threading.Lock()

    def __init__(self, path: str, iteration: int | None = None,
                 progress: Callable[[str], None] | None = None, storage_metadata=None):
        self.ckpt_dir, self.iteration = paths.resolve_checkpoint_dir(path, iteration)
        if storage_metadata is None:  # a caller that has read and checked it passes it in
            storage_metadata = io.read_storage_metadata(self.ckpt_dir)
            io.check_shard_files(self.ckpt_dir, storage_metadata)
        self.metadata = storage_metadata
        self._reader = FileSystemReader(self.ckpt_dir)
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.tensors: dict[str, StoredTensor] = {}
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                self.tensors[key] = StoredTensor(key, tuple(md.size), md.properties.dtype, len(md.chunks))
        self.progress = progress
        self.bytes_read = 0
        self._chunks_by_row: dict[str, dict[int, list]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def find(self, predicate: Callable[[str], bool]) -> list[str]:
        """The stored tensors whose keys satisfy ``predicate``.

        Args:
            predicate: a test on a storage key.

        Returns:
            The matching keys, sorted.
        """
        return sorted(k for k in self.tensors if predicate(k))

    def stored(self, key: str) -> StoredTensor:
        """What the metadata says of tensor ``key``.

        Args:
            key: a storage key.

        Returns:
            Its :class:`StoredTensor`.

        Raises:
            CheckpointError: the checkpoint has no tensor ``key``.
        """
        if key not in self.tensors:
            raise CheckpointError(f"tensor {key} is not in checkpoint {self.ckpt_dir}")
        return self.tensors[key]

    def read(self, key: str, offsets: Sequence[int] | None = None,
             sizes: Sequence[int] | None = None) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of stored tensor ``key`` (whole tensor by default).

        Args:
            key: a storage key.
            offsets: the region's start in every dim (default: all zeros).
            sizes: the region's size in every dim (default: the whole tensor).

        Returns:
            A new CPU tensor of shape ``sizes`` and the stored dtype.

        Raises:
            ValueError: the region is outside the tensor.
            CheckpointError: the stored chunks do not cover it, or reading fails.
        """
        st = self.stored(key)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(st.shape)
        sizes = tuple(sizes) if sizes is not None else st.shape
        if len(offsets) != len(st.shape) or len(sizes) != len(st.shape) or any(
                o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, sizes, st.shape)):
            raise ValueError(f"region offsets={offsets} sizes={sizes} is outside {key} of shape {st.shape}")
        buffer = torch.empty(sizes, dtype=st.dtype, device=self.buffer_device)
        if buffer.numel() == 0:
            return buffer
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, self._candidates(key, offsets, sizes), [chunk])
        covered = sum(math.prod(item.lengths) for item in items)
        if covered != buffer.numel():  # chunks not on a grid: match against all of them
            items = create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            covered = sum(math.prod(item.lengths) for item in items)
        if covered != buffer.numel():
            raise CheckpointError(f"{self.ckpt_dir}: the stored chunks of {key} cover {covered} of the "
                                  f"{buffer.numel()} elements requested (offsets {offsets}, sizes {sizes}); "
                                  "the metadata is inconsistent")
        self._read_items(key, items, buffer)
        with self._count_lock:  # reads run in several threads; ``+=`` on an attribute is not atomic
            self.bytes_read += buffer.numel() * buffer.element_size()
        return buffer

    def _read_items(self, key: str, items: list, buffer: torch.Tensor) -> None:
        """Copy the stored overlaps ``items`` (DCP ReadItems) into ``buffer``: the only storage access
        (``growth.rehearsal`` overrides it to count instead)."""
        plan = self._reader.prepare_local_plan(LoadPlan(items))
        plan = self._reader.prepare_global_plan([plan])[0]
        try:
            self._reader.read_data(plan, _RegionPlanner(buffer)).wait()
        except CheckpointError:
            raise
        except Exception as e:  # a damaged archive: name the shard and byte range, in one line
            raise damaged_checkpoint_error(self.ckpt_dir, self.metadata, e, f"reading {key} from",
                                           fqns=[key]) from None

    def _candidates(self, key: str, offsets: tuple, sizes: tuple):
        """The key's metadata with only the stored chunks in the request's first-dim rows.

        Megatron-Core stores stacked per-layer tensors one chunk per layer (and expert): a request
        for one layer need not be matched against every chunk of every layer (DCP's matcher scans
        them all, per request). The chunks' list indices are only hints in the storage index.
        """
        md = self.metadata.state_dict_metadata[key]
        if not offsets:
            return md
        rows = self._chunks_by_row.get(key)
        if rows is None:
            rows = {}
            for c in md.chunks:
                for row in range(c.offsets[0], c.offsets[0] + c.sizes[0]):
                    rows.setdefault(row, []).append(c)
            for found in rows.values():  # by second-dim start: a layer's experts, each its own chunk
                found.sort(key=lambda c: tuple(c.offsets[1:]))
            self._chunks_by_row[key] = rows
        chunks: dict = {}
        for row in range(offsets[0], offsets[0] + sizes[0]):
            found = rows.get(row, [])
            if len(offsets) > 1 and len(found) > 1:
                # Only chunks starting before the request's end in dim 1; of those starting at or before its
                # start, only the last start (on a grid the earlier ones end before it). DCP checks overlaps.
                starts = [c.offsets[1] for c in found]
                hi = bisect.bisect_left(starts, offsets[1] + sizes[1])
                at = bisect.bisect_right(starts, offsets[1]) - 1
                lo = bisect.bisect_left(starts, starts[at]) if at >= 0 else 0
                found = found[lo:hi]
            chunks.update((id(c), c) for c in found)
        return TensorStorageMetadata(md.properties, md.size, list(chunks.values()))

    def slab_extent(self, key: str, lead_dims: int, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
        """How many indices of the last of ``lead_dims`` leading dims fit in ``max_bytes`` (at least 1).

        Args:
            key: a storage key.
            lead_dims: how many leading dims a slab iterates over.
            max_bytes: the memory one slab may take.

        Returns:
            The slab length along dim ``lead_dims - 1``.
        """
        st = self.stored(key)
        inner = math.prod(st.shape[lead_dims:]) * torch.empty((), dtype=st.dtype).element_size()
        return max(1, min(st.shape[lead_dims - 1], max_bytes // max(inner, 1)))

    def iter_slabs(self, key: str, lead_dims: int = 1, max_bytes: int = DEFAULT_MAX_BYTES
                   ) -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
        """Read ``key`` slab by slab, each at most ``max_bytes`` unless one index alone is larger.

        Args:
            key: a storage key.
            lead_dims: ``index`` fixes the first ``lead_dims - 1`` dims and the start along dim
                ``lead_dims - 1``; 0 yields the whole tensor once.
            max_bytes: the memory one slab may take.

        Yields:
            ``(index, slab)``, ``slab`` of shape ``[n, *shape[lead_dims:]]``, covering the tensor.
        """
        st = self.stored(key)
        if lead_dims == 0 or not st.shape:
            yield (), self.read(key)
            return
        step = self.slab_extent(key, lead_dims, max_bytes)
        outer = st.shape[:lead_dims - 1]
        last = st.shape[lead_dims - 1]
        rest = st.shape[lead_dims:]
        for prefix in _product(outer):
            for start in range(0, last, step):
                n = min(step, last - start)
                offsets = prefix + (start,) + (0,) * len(rest)
                sizes = (1,) * len(prefix) + (n,) + rest
                yield prefix + (start,), self.read(key, offsets, sizes).reshape((n,) + rest)


def _product(dims: Sequence[int]) -> Iterator[tuple[int, ...]]:
    if not dims:
        yield ()
        return
    for i in range(dims[0]):
        for tail in _product(dims[1:]):
            yield (i,) + tail


def stderr_progress(prefix: str, min_interval_s: float = 0.0) -> Callable[[str], None]:
    """A progress sink printing ``[prefix] message`` to stderr, at most every ``min_interval_s``.

    Args:
        prefix: the name printed in brackets.
        min_interval_s: messages closer together than this are dropped.

    Returns:
        ``emit(message)``, for :class:`CheckpointReader`'s ``progress``.
    """
    last = [0.0]

    def emit(message: str) -> None:
        now = time.monotonic()
        if now - last[0] >= min_interval_s:
            last[0] = now
            print(f"[{prefix}] {message}", file=sys.stderr, flush=True)
    return emit


def checkpoint_name(path: str) -> str:
    """A short label for a checkpoint path: the run directory's name (and ``@iter`` for an iter_N dir).

    Args:
        path: a run root or an ``iter_NNNNNNN`` directory.

    Returns:
        e.g. ``base`` or ``base@4000``.
    """
    norm = os.path.normpath(os.path.abspath(path))
    base = os.path.basename(norm)
    if base.startswith("iter_") and base[5:].isdigit():
        return f"{os.path.basename(os.path.dirname(norm))}@{int(base[5:])}"
    return base
