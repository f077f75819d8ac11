"""Save and load ``torch_dist`` checkpoints through Megatron-Core ``dist_checkpointing``.

Saves are atomic (see ``layout``): every rank writes its shards into
``iter_N.incomplete-<id>``; rank 0 adds the manifest, fsyncs, renames the directory to
``iter_N`` and only then rewrites the tracker.

Loads are checked before any byte is read, so a bad checkpoint gives one readable error
(:class:`CheckpointError`) instead of a deep torch traceback: unreadable
``metadata.json``, missing or truncated ``.distcp`` shards, and tensors whose global shape
disagrees with the model (the first mismatching tensor is named with both shapes).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from megatron_grow.checkpoint import layout
from megatron_grow.errors import CheckpointError
from megatron_grow.parallel.collectives import barrier, broadcast_object, rank


def model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict:
    """Megatron-LM's nesting: ``model`` for one chunk, ``model0``, ``model1``... with virtual PP.

    The storage keys inside are global (layer offsets applied), so a checkpoint saved with
    one nesting loads with the other.
    """
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def save_checkpoint(root: str, iteration: int, sharded_state_dict: dict, manifest: dict,
                    keep_last: int | None = None) -> str:
    """Write one checkpoint atomically; returns the final ``iter_N`` directory."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    final = layout.iteration_dir(root, iteration)
    staging = broadcast_object(f"{final}{layout.INCOMPLETE_MARK}{uuid.uuid4().hex[:8]}" if rank() == 0 else None)
    if rank() == 0:
        os.makedirs(root, exist_ok=True)
        for stale in layout.incomplete_dirs(root):
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(staging)
    barrier()
    dist_checkpointing.save(sharded_state_dict, staging,
                            sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
    barrier()
    if rank() == 0:
        with open(os.path.join(staging, layout.MANIFEST_FILENAME), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=str)
        layout.fsync_tree(staging)
        if os.path.exists(final):  # re-saving an iteration: the old copy goes only after the new one is in
            retired = f"{final}{layout.INCOMPLETE_MARK}old-{uuid.uuid4().hex[:8]}"
            os.rename(final, retired)
            os.rename(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, final)
        layout.fsync_dir(root)
        layout.write_tracker(root, iteration)
        if keep_last:
            for old in layout.list_iterations(root)[:-keep_last]:
                if old != iteration:
                    shutil.rmtree(layout.iteration_dir(root, old), ignore_errors=True)
    barrier()
    return final


def read_manifest(ckpt_dir: str) -> dict:
    """Our manifest in ``iter_N`` (empty for checkpoints written by Megatron-LM itself)."""
    path = os.path.join(ckpt_dir, layout.MANIFEST_FILENAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


def read_storage_metadata(ckpt_dir: str):
    """torch.distributed.checkpoint metadata (``.metadata``) with clear errors."""
    from torch.distributed.checkpoint import FileSystemReader

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


def check_shard_files(ckpt_dir: str, storage_metadata=None) -> None:
    """Every byte range the metadata points at must exist: catches missing and truncated shards."""
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
    """All ShardedTensors in a (factory-applied) sharded state dict, nested dicts and lists included."""
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
    """Name the first tensor the checkpoint lacks or stores with another global shape."""
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

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
    """Load into ``sharded_state_dict`` after the checks above; returns the loaded state dict."""
    from megatron.core import dist_checkpointing

    md = read_storage_metadata(ckpt_dir)
    check_shard_files(ckpt_dir, md)
    check_against_checkpoint(sharded_state_dict, ckpt_dir, md)
    try:
        return dist_checkpointing.load(sharded_state_dict, ckpt_dir, validate_access_integrity=validate,
                                       strict=strict)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"loading {ckpt_dir} failed ({type(e).__name__}: {e})") from e


def checkpoint_bytes(ckpt_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt_dir) for f in fs)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
