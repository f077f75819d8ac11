"""Save and load ``torch_dist`` checkpoints through Megatron-Core ``dist_checkpointing``.

Saves are atomic (see ``paths``): every rank writes its shards into
``iter_N.incomplete-<id>``; rank 0 adds the manifest, fsyncs, renames the directory to
``iter_N`` and only then rewrites the tracker.

Loads are checked before any byte is read, so a bad checkpoint gives one readable error
(:class:`CheckpointError`) instead of a deep torch traceback: unreadable
``metadata.json``, missing or truncated ``.distcp`` shards, and tensors whose global shape
disagrees with the model (the first mismatching tensor is named with both shapes).
"""

from __future__ import annotations

import contextlib
import errno
import io as io_module
import json
import os
import pickle
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

# Megatron-Core is imported inside the functions that use it: reading a manifest or the storage
# metadata (export-hf, inspection) must not pay its import (seconds).
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from megatron_grow.checkpoint import paths
from megatron_grow.checkpoint.integrity import damaged_checkpoint_error, read_error_text, root_cause
from megatron_grow.errors import CheckpointError, UserInputError
from megatron_grow.parallel.collectives import broadcast_object, rank

STAGING_MARK = paths.STAGING_MARK  # <dest>.staging-<host>-<pid>-<id>: a run directory written beside dest


def model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict:
    """Megatron-LM's nesting: ``model`` for one chunk, ``model0``, ``model1``... with virtual PP.

    The storage keys inside are global (layer offsets applied), so a checkpoint saved with
    one nesting loads with the other.

    Args:
        model_chunks: this rank's model chunks (one per virtual pipeline stage).

    Returns:
        ``{"model": ...}`` or ``{"model0": ..., "model1": ...}`` of the chunks' sharded state dicts.
    """
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def save_checkpoint(root: str, iteration: int, sharded_state_dict: dict, manifest: dict,
                    keep_last: int | None = None, produce: Callable | None = None) -> str:
    """Write one checkpoint atomically; returns the final ``iter_N`` directory (collective).

    ``produce``: tensors of ``sharded_state_dict`` on the meta device are computed by
    ``produce(sharded_tensor)`` while they are written (``checkpoint.streaming``), so they never
    all sit in memory; without it, ``dist_checkpointing.save`` writes tensors already in memory.
    Any failure (a full disk, an exception mid-write, on any rank) removes the staging
    directory and leaves the previous checkpoint and the tracker as they were; a full or
    read-only disk is a :class:`CheckpointError`, anything else keeps its own type.

    Args:
        root: the run directory (``iter_NNNNNNN`` and the tracker go under it).
        iteration: the iteration to save as.
        sharded_state_dict: what to save (model, optimizer, RNG, common entries).
        manifest: our manifest (``manifest.build_manifest``), written as ``megatron_grow.json``.
        keep_last: remove older ``iter_N`` directories beyond this many (None keeps all).
        produce: see above.

    Returns:
        The final ``iter_NNNNNNN`` directory.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    final = paths.iteration_dir(root, iteration)
    staging = broadcast_object(f"{final}{paths.INCOMPLETE_MARK}{uuid.uuid4().hex[:8]}" if rank() == 0 else None)
    needed = _bytes_to_write(sharded_state_dict, manifest)
    _on_rank0(lambda: _prepare_save_dir(root, staging, needed), staging, final)
    try:
        with _writer_thread_errors_kept():
            if produce is not None:
                from megatron_grow.checkpoint import streaming

                streaming.save_streaming(sharded_state_dict, staging, produce)
            else:
                dist_checkpointing.save(sharded_state_dict, staging,
                                        sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
        local_error = None
    except (Exception, CheckpointException) as e:  # collected below: every rank takes the same way out
        local_error = e
    except BaseException:  # Ctrl-C: no partial save stays behind
        paths.remove_tree(staging)
        raise
    if local_error is not None and _interrupted(local_error):
        paths.remove_tree(staging)
        raise KeyboardInterrupt from None
    if _any_rank(local_error is not None):
        disk_full = rank() == 0 and _free_bytes(root) < needed  # torch often hides ENOSPC in its own errors
        if rank() == 0:
            paths.remove_tree(staging)
        disk_full = broadcast_object(disk_full)
        if disk_full:
            raise CheckpointError(f"saving {final} failed: no space left on device ({needed / 2**20:.1f} MiB "
                                  "needed); the partial save was removed and the previous checkpoint (if any) "
                                  "is unchanged") from local_error
        if local_error is None:
            raise CheckpointError(f"saving {final} failed on another rank; the partial save was removed")
        raise _save_error(local_error, final) from local_error
    _on_rank0(lambda: _finish_save(root, iteration, staging, final, manifest, keep_last), staging, final)
    return final


def save_checkpoint_replacing(dest: str, iteration: int, sharded_state_dict: dict, manifest: dict,
                              produce: Callable | None = None, check: Callable[[str], None] | None = None) -> str:
    """A new run directory at ``dest`` holding one checkpoint (collective); returns its ``iter_N``.

    The checkpoint is saved into ``<dest>.staging-<host>-<pid>-<id>`` beside ``dest``; ``check``
    (collective, e.g. grow's verify) then runs on that complete staging run directory, and only
    when it returns is the staging directory swapped in (``paths.replace_dir``). So an existing
    ``dest`` is removed only after the new one is complete and checked; a failed check, an
    exception or Ctrl-C leaves ``dest`` as it was and removes the staging directory, and a crash
    at any moment leaves the old or the new run directory at ``dest``. A link at ``dest`` keeps
    pointing at the new directory.

    Args:
        dest: the run directory to create or replace.
        iteration: the iteration to save as.
        sharded_state_dict: what to save.
        manifest: our manifest, written as ``megatron_grow.json``.
        produce: computes lazy tensors while they are written (:func:`save_checkpoint`).
        check: collective; runs on the complete staging run directory before the swap.

    Returns:
        The final ``iter_NNNNNNN`` directory under ``dest``.
    """
    real = os.path.realpath(dest)
    staging = broadcast_object(paths.staging_path(real) if rank() == 0 else None)
    if rank() == 0:
        paths.recover_retired(real)
        paths.remove_stale_staging(real)  # left by a killed earlier attempt (its process is gone)
    try:
        save_checkpoint(staging, iteration, sharded_state_dict, manifest, produce=produce)
        if check is not None:
            check(staging)
        _on_rank0(lambda: paths.replace_dir(staging, real), staging, real)
    finally:
        if rank() == 0 and os.path.lexists(staging):
            paths.remove_tree(staging)
    return paths.iteration_dir(dest, iteration)


@contextlib.contextmanager
def _writer_thread_errors_kept():
    """An error in one of torch's writer threads (a full disk, an abandoned save) fails the save,
    which reports it once as one line; the thread's own traceback is not printed on the way."""
    before = set(threading.enumerate())
    previous = threading.excepthook

    def hook(args):
        if args.thread in before or "_write_files_from_queue" not in (args.thread.name if args.thread else ""):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    except BaseException:
        from megatron_grow.checkpoint import streaming

        streaming.join_writer_threads(before)  # their errors land in the hook above, not on stderr
        raise
    finally:
        threading.excepthook = previous


def _prepare_save_dir(root: str, staging: str, needed: int) -> None:
    os.makedirs(root, exist_ok=True)
    free = _free_bytes(root)
    if free < needed:
        shown = root.split(paths.STAGING_MARK)[0]  # grow's staging run directory: name its --save
        raise CheckpointError(f"cannot save to {shown}: no space left on device ({free / 2**20:.1f} MiB free, "
                              f"the checkpoint needs about {needed / 2**20:.1f} MiB)")
    for kept in paths.retired_iteration_dirs(root):  # an interrupted re-save: keep one complete copy
        paths.recover_retired(kept)
    for stale in paths.incomplete_dirs(root):
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(staging)


def _finish_save(root: str, iteration: int, staging: str, final: str, manifest: dict,
                 keep_last: int | None) -> None:
    with open(os.path.join(staging, paths.MANIFEST_FILENAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, default=str)
    paths.fsync_tree(staging)
    # Re-saving an iteration swaps the copies in one step: the tracker never names a missing directory.
    paths.replace_dir(staging, final)
    paths.write_tracker(root, iteration)
    if keep_last:
        for old in paths.list_iterations(root)[:-keep_last]:
            if old != iteration:
                shutil.rmtree(paths.iteration_dir(root, old), ignore_errors=True)


def _on_rank0(step, staging: str, final: str) -> None:
    """Run ``step`` on rank 0; on failure remove the staging dir and raise on every rank."""
    message, error = None, None
    if rank() == 0:
        try:
            step()
        except Exception as e:
            paths.remove_tree(staging)
            error = e
            message = str(_save_error(e, final))
    message = broadcast_object(message)
    if error is not None:
        raise _save_error(error, final) from error
    if message is not None:
        raise CheckpointError(message)


def _bytes_to_write(sharded_state_dict: dict, manifest: dict | None = None) -> int:
    """Bytes one copy of this checkpoint takes on disk, summed over ranks (collective).

    Computed from what the writers will write, not from the parameters alone: every main-replica
    ShardedTensor (factories applied on a copy, so the distributed optimizer's state counts) with
    the framing ``torch.save`` puts around each item in a ``.distcp`` file, every ShardedObject
    (``_extra_state``, RNG) as it serializes, the common state (``common.pt``, rank 0), torch's
    ``.metadata`` (the real metadata classes, pickled), our manifest, and one filesystem block per
    file for the partly filled last block.
    """
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject, ShardedTensor, apply_factories
    probe = _copy_containers(sharded_state_dict)
    apply_factories(probe)
    sharded, common = extract_matching_values(probe, lambda v: isinstance(v, ShardedBase))
    local, entries = 0, []
    for leaf in _leaves(sharded):
        replica = leaf.replica_id if isinstance(leaf.replica_id, tuple) else (leaf.replica_id,)
        if not all(r == 0 for r in replica):
            continue
        if isinstance(leaf, ShardedTensor) and isinstance(leaf.data, torch.Tensor):
            local += leaf.data.numel() * leaf.data.element_size() + _item_framing(leaf.data.dtype)
            entries.append((leaf.key, tuple(leaf.global_shape), tuple(leaf.global_offset), tuple(leaf.local_shape)))
        elif isinstance(leaf, ShardedObject):
            local += len(_serialized(leaf.data))
            entries.append((leaf.key, tuple(leaf.global_shape), tuple(leaf.global_offset), ()))
    local += _metadata_bytes(entries) + _WRITER_FILES_PER_RANK * _BLOCK
    if rank() == 0:
        local += len(_serialized(common)) + (len(json.dumps(manifest, indent=2, sort_keys=True, default=str))
                                             if manifest else 0) + _SMALL_FILES * _BLOCK
    if not torch.distributed.is_initialized():
        return local
    total = torch.tensor([local], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return int(total.item())


_BLOCK = 4096                # the partly filled last block of each file
_WRITER_FILES_PER_RANK = 2   # torch's writer: one .distcp file per writer thread
_SMALL_FILES = 6             # common.pt, .metadata, metadata.json, megatron_grow.json, tracker, its temp


def _leaves(tree: Any) -> Iterable:
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


def _serialized(obj: Any) -> bytes:
    buffer = io_module.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


_FRAMING: dict = {}


def _item_framing(dtype: torch.dtype) -> int:
    """What ``torch.save`` writes around one tensor's bytes in a ``.distcp`` file (zip records,
    pickled header, data alignment), measured once per dtype on an empty tensor."""
    if dtype not in _FRAMING:
        _FRAMING[dtype] = len(_serialized(torch.empty(0, dtype=dtype))) + 64  # + the data's 64-byte alignment
    return _FRAMING[dtype]


def _metadata_bytes(entries: list) -> int:
    """This rank's share of torch's ``.metadata``: its items in the real metadata classes (the
    storage index, and the save plans torch keeps there too), pickled."""
    tensors, storage, items = {}, {}, []
    for key, shape, offset, local_shape in entries:
        if local_shape:
            chunk = ChunkStorageMetadata(torch.Size(offset), torch.Size(local_shape))
            props = TensorProperties(dtype=torch.float32)
            tensors[key] = TensorStorageMetadata(props, torch.Size(shape), [chunk])
            index = MetadataIndex(key, torch.Size(offset), 0)
            items.append(WriteItem(index, WriteItemType.SHARD, TensorWriteData(chunk, props, torch.Size(shape))))
        else:  # a ShardedObject: one bytes item per shard
            index = MetadataIndex(f"{key}/shard_{'_'.join(map(str, offset))}_{'_'.join(map(str, shape))}")
            tensors[index.fqn] = BytesStorageMetadata()
            items.append(WriteItem(index, WriteItemType.BYTE_IO))
        storage[index] = _StorageInfo(f"__{rank()}_0.distcp", 2**40, 2**40)
    metadata = Metadata(state_dict_metadata=tensors, storage_data=storage)
    metadata.all_local_plans = [SavePlan(items)]  # Megatron-Core's saver stores the plans there too
    return len(pickle.dumps(metadata))


def _free_bytes(path: str) -> int:
    existing = os.path.realpath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    st = os.statvfs(existing)
    return st.f_bavail * st.f_frsize


def _any_rank(flag: bool) -> bool:
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


_DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def _save_error(error: BaseException, final: str) -> BaseException:
    """A full, read-only or forbidden disk becomes one readable CheckpointError; the rest stays."""
    if isinstance(error, CheckpointError):
        return error
    if isinstance(root_cause(error), UserInputError):  # e.g. a damaged source shard, read by another rank
        return root_cause(error)
    for code, text in _DISK_ERRORS.items():
        if _has_errno(error, code):
            return CheckpointError(f"saving {final} failed: {text}; the partial save was removed and the "
                                   "previous checkpoint (if any) is unchanged")
    return error


def _has_errno(error: BaseException, code: int) -> bool:
    """Whether ``code`` appears in ``error``: its chain, torch's per-rank failures, or its text."""
    return _any_cause(error, lambda e: (isinstance(e, OSError) and e.errno == code) or f"[Errno {code}]" in str(e))


def _interrupted(error: BaseException) -> bool:
    """A Ctrl-C that torch's checkpoint code caught and wrapped into its own exception."""
    return _any_cause(error, lambda e: isinstance(e, KeyboardInterrupt))


def _any_cause(error: BaseException, test: Callable[[BaseException], bool], depth: int = 0) -> bool:
    """Whether ``test`` holds for ``error``, its chain, or torch's per-rank failures inside it."""
    if not isinstance(error, BaseException) or depth > 8:
        return False
    if test(error):
        return True
    failures = getattr(error, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if isinstance(failures, dict):
        for failure in failures.values():
            if isinstance(failure, tuple):  # torch's WRAPPED_EXCEPTION: (exception, traceback)
                failure = failure[0]
            if _any_cause(getattr(failure, "exc", failure), test, depth + 1):
                return True
    return _any_cause(error.__cause__ or error.__context__, test, depth + 1)


def read_manifest(ckpt_dir: str) -> dict:
    """Our manifest in ``iter_N`` (empty for checkpoints written by Megatron-LM itself).

    Args:
        ckpt_dir: an ``iter_NNNNNNN`` directory.

    Returns:
        The parsed ``megatron_grow.json``, or ``{}``.

    Raises:
        CheckpointError: the file exists but is unreadable.
    """
    path = os.path.join(ckpt_dir, paths.MANIFEST_FILENAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


def read_storage_metadata(ckpt_dir: str):
    """torch.distributed.checkpoint metadata (``.metadata``) with clear errors.

    Args:
        ckpt_dir: an ``iter_NNNNNNN`` directory.

    Returns:
        DCP's ``Metadata`` (every stored tensor's global shape, dtype and chunks).

    Raises:
        CheckpointError: not a torch_dist checkpoint, or the metadata is unreadable.
    """
    meta_json = os.path.join(ckpt_dir, "metadata.json")
    if not os.path.isfile(meta_json):
        raise CheckpointError(f"{ckpt_dir} is not a torch_dist checkpoint: metadata.json is missing")
    try:
        with open(meta_json, encoding="utf-8") as f:
            fmt = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_json} is unreadable: {e}") from None
    if fmt.get("sharded_backend") != "torch_dist":
        raise CheckpointError(f"{ckpt_dir} has format {fmt.get('sharded_backend')!r}; only torch_dist is supported")
    try:
        return FileSystemReader(ckpt_dir).read_metadata()
    except Exception as e:  # torch raises several types for a damaged .metadata
        raise CheckpointError(f"{ckpt_dir}/.metadata is unreadable ({type(e).__name__}: {e})") from None


def read_common_state(ckpt_dir: str) -> dict:
    """The non-sharded part of a checkpoint (``common.pt``), or a CheckpointError naming the file.

    Args:
        ckpt_dir: an ``iter_NNNNNNN`` directory.

    Returns:
        The common state dict.
    """
    from megatron.core import dist_checkpointing
    path = os.path.join(ckpt_dir, "common.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return dist_checkpointing.load_common_state_dict(ckpt_dir)
    except Exception as e:  # torch.load raises RuntimeError, UnpicklingError, EOFError... for a damaged file
        raise CheckpointError(f"{path} is unreadable ({read_error_text(e)})") from None


def check_shard_files(ckpt_dir: str, storage_metadata=None) -> None:
    """Every byte range the metadata points at must exist: catches missing and truncated shards.

    Args:
        ckpt_dir: an ``iter_NNNNNNN`` directory.
        storage_metadata: its metadata, when the caller has read it already.

    Raises:
        CheckpointError: naming the first missing or truncated shard file.
    """
    md = storage_metadata or read_storage_metadata(ckpt_dir)
    needed: dict[str, int] = {}
    for info in md.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(needed.items()):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint shard missing: {path}")
        size = os.path.getsize(path)
        if size < end:
            raise CheckpointError(f"checkpoint shard truncated: {path} has {size} bytes, metadata needs {end}")


def iter_sharded_tensors(sharded_state_dict: Any) -> Iterable:
    """All ShardedTensors in a (factory-applied) sharded state dict, nested dicts and lists included.

    Args:
        sharded_state_dict: nested dicts and lists of sharded entries.

    Yields:
        Each ``ShardedTensor``, in order.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    if isinstance(sharded_state_dict, ShardedTensor):
        yield sharded_state_dict
    elif isinstance(sharded_state_dict, dict):
        for v in sharded_state_dict.values():
            yield from iter_sharded_tensors(v)
    elif isinstance(sharded_state_dict, (list, tuple)):
        for v in sharded_state_dict:
            yield from iter_sharded_tensors(v)


def check_against_checkpoint(sharded_state_dict: dict, ckpt_dir: str, storage_metadata=None) -> None:
    """Name the first tensor the checkpoint lacks or stores with another global shape.

    Args:
        sharded_state_dict: what a load would fill (its factories are left unapplied).
        ckpt_dir: an ``iter_NNNNNNN`` directory.
        storage_metadata: its metadata, when the caller has read it already.

    Raises:
        CheckpointError: the architecture differs.
    """
    from megatron.core.dist_checkpointing.mapping import apply_factories
    md = storage_metadata or read_storage_metadata(ckpt_dir)
    stored = {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    probe = _copy_containers(sharded_state_dict)  # apply_factories replaces entries in place: not the caller's
    apply_factories(probe)
    for st in iter_sharded_tensors(probe):
        if st.key not in stored:
            raise CheckpointError(f"tensor {st.key} (shape {tuple(st.global_shape)}) is not in checkpoint "
                                  f"{ckpt_dir}: the architecture differs")
        if tuple(st.global_shape) != stored[st.key]:
            raise CheckpointError(f"tensor {st.key}: checkpoint {ckpt_dir} has global shape {stored[st.key]}, "
                                  f"the model expects {tuple(st.global_shape)}")


def _copy_containers(tree: Any) -> Any:
    """A copy of the nested dicts/lists of a sharded state dict; the leaves are shared.

    The distributed optimizer's model-space formats find each parameter's ShardedTensor by the
    parameter object, so the caller's state dict must keep its factories unapplied.
    """
    if isinstance(tree, dict):
        return {k: _copy_containers(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy_containers(v) for v in tree]
    return tree


def load_checkpoint(ckpt_dir: str, sharded_state_dict: dict, *, validate: bool = True,
                    strict: str = "assume_ok_unexpected") -> dict:
    """Load into ``sharded_state_dict`` after the checks above; returns the loaded state dict.

    Args:
        ckpt_dir: an ``iter_NNNNNNN`` directory.
        sharded_state_dict: what to fill.
        validate: let ``dist_checkpointing`` check that the shards cover every tensor.
        strict: ``dist_checkpointing``'s handling of keys present on one side only.

    Returns:
        The loaded state dict.
    """
    from megatron.core import dist_checkpointing
    md = read_storage_metadata(ckpt_dir)
    check_shard_files(ckpt_dir, md)
    check_against_checkpoint(sharded_state_dict, ckpt_dir, md)
    read_common_state(ckpt_dir)  # a damaged common.pt is named here (the load reads it without its name)
    try:
        return dist_checkpointing.load(sharded_state_dict, ckpt_dir, validate_access_integrity=validate,
                                       strict=strict)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        raise damaged_checkpoint_error(ckpt_dir, md, e, "loading", scan=rank() == 0) from None


def checkpoint_bytes(ckpt_dir: str) -> int:
    """The bytes a checkpoint takes on disk.

    Args:
        ckpt_dir: an ``iter_NNNNNNN`` directory.

    Returns:
        The total size of its files.
    """
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt_dir) for f in fs)


def now() -> str:
    """The local time for a manifest's ``created`` field (ISO 8601 with the UTC offset)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
