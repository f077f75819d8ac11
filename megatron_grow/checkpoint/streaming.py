"""Save a ``torch_dist`` checkpoint whose tensors are produced one at a time while they are written.

``dist_checkpointing.save`` needs every tensor in memory before it writes the first byte (and
Megatron-Core's writer then copies views and forks writer processes). A checkpoint that is
*computed* from another one -- a grown model -- does not need to exist in memory at all: this
module writes the same format with torch's own ``torch.distributed.checkpoint.save`` and a
``FileSystemWriter``, whose writer threads ask the planner for each tensor just before writing
it (``SavePlanner.resolve_data``). Tensors whose ``ShardedTensor.data`` is on the meta device are
*lazy*: the planner calls ``produce(sharded_tensor)`` for them, writes the result and drops it,
so memory holds a few tensors per writer thread, not the rank's share of the model.

The result is what ``dist_checkpointing.save`` writes (stock Megatron-Core loads it strictly):
the sharded part goes through Megatron-Core's own conversion (``mcore_to_pyt_state_dict``, main
replicas only) and save planner, the common part to ``common.pt`` through Megatron-Core's
common strategy, and ``metadata.json`` through ``save_config``. Files are written without a
per-file fsync, past the page cache where the filesystem allows it (``checkpoint.direct_io``); every
rank fsyncs its own files once at the end (the caller still fsyncs the
tree and renames it into place, ``checkpoint.io``).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable

import torch
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.serialization import (
    get_default_save_common_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.default_planner import _validate_global_plan, create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megatron_grow.checkpoint.direct_io import DirectFileSystem
from megatron_grow.errors import CheckpointError

DEFAULT_WRITER_THREADS = 2


class SaveAbandoned(Exception):
    """Raised in a writer thread once the save it works for has failed or was interrupted."""


def join_writer_threads(before: set) -> None:
    """Wait for the writer threads torch's ``FileSystemWriter`` started since ``before`` (named after
    their target), so nothing writes into a save directory once it is removed."""
    for thread in threading.enumerate():
        if thread not in before and "_write_files_from_queue" in thread.name and thread.is_alive():
            thread.join()


def is_lazy(sharded_tensor) -> bool:
    """Whether a sharded tensor is to be produced while it is written (its data is on the meta device).

    Args:
        sharded_tensor: a ``ShardedTensor``.

    Returns:
        True for a lazy tensor.
    """
    data = getattr(sharded_tensor, "data", None)
    return isinstance(data, torch.Tensor) and data.is_meta


def save_streaming(sharded_state_dict: dict, checkpoint_dir: str, produce: Callable,
                   threads: int | None = None) -> int:
    """Write ``sharded_state_dict`` into ``checkpoint_dir`` (collective); returns the number of lazy
    tensors this rank produced. ``produce(st)`` returns the values of lazy ShardedTensor ``st``
    (shape ``st.local_shape``); a ``produce.check_complete()`` method, if any, is called once all
    is written (raising fails the save).

    Args:
        sharded_state_dict: the state dict to save; lazy tensors (:func:`is_lazy`) are produced.
        checkpoint_dir: the (staging) directory to write.
        produce: computes a lazy tensor's local shard.
        threads: writer threads of this rank (None: ``DEFAULT_WRITER_THREADS``, read at call time).

    Returns:
        The number of lazy tensors this rank produced.
    """
    common, pyt_state_dict, planner, lazy_count = streaming_save_plan(sharded_state_dict, produce)
    get_default_save_common_strategy().save_common(common, checkpoint_dir)
    writer = FileSystemWriter(checkpoint_dir, thread_count=threads or DEFAULT_WRITER_THREADS, sync_files=False)
    writer.fs = DirectFileSystem()  # the same files, written past the page cache (checkpoint.direct_io)
    before = set(threading.enumerate())
    save_error = None
    try:
        with _quiet_producer_errors(planner):
            dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)  # raises on every rank, or on none
    except CheckpointException as e:  # every rank gets here: the flag below keeps them in step
        save_error = e
        # torch's other writer threads may still be writing; stop them at their next tensor first.
        planner.stopped = True
        join_writer_threads(before)
    except BaseException:
        # Ctrl-C, or an error in the main writer: torch's other writer threads would go on writing
        # (into a directory the caller is about to remove); stop them at their next tensor first.
        planner.stopped = True
        join_writer_threads(before)
        raise
    # The producer's own error where it failed; elsewhere DCP's, which carries it (checkpoint.io unwraps).
    problem = (planner.error or save_error) if save_error else local_problem(planner, lazy_count, produce,
                                                                             checkpoint_dir)
    if problem is None:
        _fsync_own_files(checkpoint_dir)
    flag = torch.tensor([0 if problem is None else 1], dtype=torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # every rank leaves the same way
    if flag.item():
        raise problem or CheckpointError(f"saving {checkpoint_dir} failed on another rank")
    strategy = get_default_save_sharded_strategy("torch_dist")
    if torch.distributed.get_rank() == 0:
        save_config(CheckpointingConfig(strategy.backend, strategy.version), checkpoint_dir)
    torch.distributed.barrier()
    return planner.produced


def streaming_save_plan(sharded_state_dict: dict, produce: Callable | None) -> tuple[dict, dict, object, int]:
    """What :func:`save_streaming` hands torch DCP, before any I/O: the common (non-sharded) state, the
    torch state dict (main replicas only), the producing save planner and the number of lazy tensors.

    Also the seam of the growth rehearsal (``growth.rehearsal``), which drives the same planner
    through DCP's planning steps with no storage behind it."""
    # The model's own sharded state dict: the sharding is Megatron-Core's, so integrity is not re-proven here.
    sharded, common = save_preprocess(sharded_state_dict, validate_access_integrity=False)
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    lazy = {(st.key, tuple(st.global_offset)): st for sts in flat.values() for st in sts if is_lazy(st)}
    # Keys whose shards are all lazy skip Megatron-Core's conversion to torch ShardedTensors (whose
    # pairwise shard-overlap check is quadratic in the shards per key: 15 s per rank at 4 GiB grown,
    # 2,688 expert shards per key and rank) and describe their write items directly (LazyShards).
    lazy_keys = {key for key, sts in flat.items() if all(is_lazy(st) for st in sts)}
    pyt_state_dict = mcore_to_pyt_state_dict({k: v for k, v in flat.items() if k not in lazy_keys}, is_loading=False)
    pyt_state_dict.update({key: LazyShards(flat[key]) for key in lazy_keys})
    return common, pyt_state_dict, _producing_planner(lazy, produce), len(lazy)


class LazyShards:
    """This rank's lazy shards of one stored tensor, as torch DCP's save planner sees them.

    DCP asks a state-dict value with a ``__create_write_items__`` method for its write items
    (``planner_helpers._create_write_items``). This one returns, for each Megatron-Core
    ShardedTensor, exactly the item Megatron-Core's torch ShardedTensor would have produced
    (``sharded_tensor_to_torch_sharded_tensor``: the chunk carries the prepended layer/expert axes as
    size-1 dims; properties of the detached data) -- tested item for item in
    ``tests/unit/test_streaming_plan.py`` -- without building that ShardedTensor.
    """

    def __init__(self, shards: list):
        self.shards = shards

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [lazy_write_item(fqn, st) for st in self.shards]


def lazy_write_item(fqn: str, st) -> WriteItem:
    """DCP's write item for one lazy Megatron-Core ShardedTensor (non-flattened) stored under ``fqn``."""
    offsets = torch.Size(st.global_offset)
    properties = TensorProperties(dtype=st.data.dtype, layout=st.data.layout, requires_grad=False,
                                  memory_format=torch.contiguous_format, pin_memory=False)
    chunk = ChunkStorageMetadata(offsets=offsets, sizes=torch.Size((1,) * st.prepend_axis_num + tuple(st.local_shape)))
    return WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                     tensor_data=TensorWriteData(chunk=chunk, properties=properties, size=torch.Size(st.global_shape)))


def global_plan_errors(global_plan: list, metadata: Metadata) -> list[str]:
    """What DCP's ``_validate_global_plan`` reports (chunks out of bounds, overlapping, not filling the
    tensor), in O(n log n) for chunks on a grid.

    DCP's own check sweeps the largest dim, along which Megatron-Core's per-layer/per-expert chunks
    all overlap, so it compares every pair (12 s on rank 0 at 4 GiB grown). When, in every dim, the
    chunks' distinct intervals are disjoint (a grid, which is how Megatron-Core shards), two chunks
    overlap exactly when they are the same box, so duplicates are the only overlaps. A key whose chunks
    are not on a grid is checked by DCP's own function.
    """
    errors: list[str] = []
    for key, value in metadata.state_dict_metadata.items():
        if isinstance(value, BytesStorageMetadata) or len(value.size) == 0:
            continue
        if not _on_grid(value.chunks):
            errors += _validate_global_plan(global_plan, Metadata({key: value}))
            continue
        volume = 0
        for chunk in value.chunks:
            if any(o < 0 or o + n > d for o, n, d in zip(chunk.offsets, chunk.sizes, value.size)):
                errors.append(f"key:{key} has out of bounds chunk: tensor-size:{value.size} chunk: {chunk}")
            volume += math.prod(chunk.sizes)
        boxes = {(tuple(c.offsets), tuple(c.sizes)) for c in value.chunks}
        if len(boxes) != len(value.chunks):
            errors.append(f"key:{key} has overlapping chunks ({len(value.chunks) - len(boxes)} duplicated)")
        if len(global_plan) > 1 and volume != math.prod(value.size):
            errors.append(f"key:{key} invalid fill tensor-volume: {math.prod(value.size)} chunks-volume: {volume}")
    return errors


def _on_grid(chunks: list) -> bool:
    """Whether, in every dim, the distinct intervals the chunks occupy are pairwise disjoint."""
    for dim in range(len(chunks[0].offsets) if chunks else 0):
        intervals = sorted({(c.offsets[dim], c.sizes[dim]) for c in chunks})
        for (start_a, size_a), (start_b, _) in zip(intervals, intervals[1:]):
            if start_a + size_a > start_b:
                return False
    return True


def local_problem(planner, expected: int, produce: Callable, checkpoint_dir: str) -> BaseException | None:
    """What went wrong on this rank only: an error in a writer thread other than the main one (DCP
    would only print it), a tensor never asked for, or the producer's own account."""
    if planner.error is not None:
        return planner.error
    if planner.produced != expected:
        return CheckpointError(f"{checkpoint_dir}: {expected - planner.produced} of {expected} tensors of this "
                               "rank were planned but never written")
    try:
        if hasattr(produce, "check_complete"):
            produce.check_complete()
    except Exception as e:  # raised after the barrier, like the others
        return e
    return None


@contextlib.contextmanager
def _quiet_producer_errors(planner):
    """A producer's error ends its writer thread; Python would print that thread's traceback, but
    the error is reported once, by the caller (a damaged source shard, a non-finite source tensor:
    one line, not a traceback per writer thread)."""
    previous = threading.excepthook

    def hook(args):
        if not any(args.exc_value is e for e in planner.producer_errors):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _producing_planner(lazy: dict, produce: Callable):
    """Megatron-Core's save planner, except that lazy tensors are produced when the writer asks."""
    class ProducingPlanner(MCoreSavePlanner):
        def __init__(self):
            super().__init__(flatten_state_dict=False)
            self.produced = 0
            self.error: BaseException | None = None
            self.stopped = False
            self.producer_errors: list[BaseException] = []  # one per writer thread that failed
            self._lock = threading.Lock()

        def _create_global_plan(self, all_plans):
            # DCP's, with its quadratic chunk-overlap check replaced by global_plan_errors.
            global_plan, metadata = create_default_global_save_plan(self._dedup_save_plans(all_plans))
            errors = global_plan_errors(global_plan, metadata)
            if errors:
                raise ValueError(f"Failed to validate global plan: {'; '.join(errors)[:500]}")
            return global_plan, metadata

        def resolve_data(self, write_item):
            index = write_item.index
            st = lazy.get((index.fqn, tuple(index.offset))) if write_item.type != WriteItemType.BYTE_IO else None
            if self.stopped:
                raise SaveAbandoned("the save was abandoned")
            if st is None:
                return super().resolve_data(write_item)
            try:
                value = produce(st)
            except BaseException as e:
                self.error = self.error or e
                self.producer_errors.append(e)
                raise
            if tuple(value.shape) != tuple(st.local_shape) or value.dtype != st.dtype:
                raise CheckpointError(f"{st.key} at {tuple(st.global_offset)}: produced {tuple(value.shape)} "
                                      f"{value.dtype}, the checkpoint needs {tuple(st.local_shape)} {st.dtype}")
            with self._lock:
                self.produced += 1
            # The stored chunk carries the prepended (layer, expert) axes as size-1 dims.
            return value.contiguous().reshape(tuple(write_item.tensor_data.chunk.sizes))

    return ProducingPlanner()


def _fsync_own_files(checkpoint_dir: str) -> None:
    """One fsync per file this rank wrote (``__<rank>_<i>.distcp``), after all of them are written."""
    mine = f"__{torch.distributed.get_rank()}_"
    for name in os.listdir(checkpoint_dir):
        if name.startswith(mine) and name.endswith(".distcp"):
            fd = os.open(os.path.join(checkpoint_dir, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
