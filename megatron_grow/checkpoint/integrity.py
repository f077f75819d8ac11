"""Name the damaged file when torch cannot read part of a checkpoint, in one line of our own words.

A ``.distcp`` shard is a concatenation of items, each a ``torch.save`` zip archive (tensors) or
raw bytes (pickled objects), at the byte ranges ``.metadata`` records (``storage_data``). DCP
keeps no checksums, so damage shows only when an archive no longer parses, and then torch
reports it without the file's name (the read runs per item in a thread, possibly wrapped in a
``CheckpointException``, which is a ``BaseException``), with advice of its own ("re-run with
weights_only=False", "please file an issue") that is wrong for a damaged file.

:func:`read_error_text` turns such an error into a short reason; :func:`damaged_checkpoint_error`
re-reads the tensor items (only after a read has failed) to name the shard and byte range that
no longer parses.
"""

from __future__ import annotations

import io as _io
import os
import re
from collections.abc import Iterable

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_grow.errors import CheckpointError

# Sentences torch appends to its read errors: advice for a different situation (untrusted pickles,
# torch bugs), dropped so that our one line says what is wrong with the file.
TORCH_ADVICE_MARKERS = ("This is an internal miniz error", "If you are seeing this error", "Please file an issue",
                        "please file an issue", "In PyTorch 2.6", "Re-running `torch.load`", "GLHF")
WEIGHTS_ONLY_FAILURE = "Weights only load failed"


def root_cause(error: BaseException) -> BaseException:
    """The first per-rank exception inside torch's ``CheckpointException`` (itself otherwise)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        inner = first[0] if isinstance(first, tuple) else first
        if isinstance(inner, BaseException) and inner is not error:
            return root_cause(inner)
    return error


def read_error_text(error: BaseException) -> str:
    """``Type: reason`` of a failed torch read, one line, without torch's advice."""
    error = root_cause(error)
    text = str(error).strip()
    if WEIGHTS_ONLY_FAILURE in text:
        # The reason follows "WeightsUnpickler error:", sometimes after blank lines.
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        detail = found.group(1).strip() if found else "unknown content"
        return f"{type(error).__name__}: not a tensor file ({detail})"
    first = text.splitlines()[0].strip() if text else ""
    for marker in TORCH_ADVICE_MARKERS:
        first = first.split(marker)[0].strip()
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _tensor_items(storage_metadata, fqns: Iterable[str] | None) -> list:
    """``(fqn, storage info)`` of the tensor items (the ``torch.save`` archives), in file order."""
    wanted = set(fqns) if fqns is not None else None
    items = [(index.fqn, info) for index, info in storage_metadata.storage_data.items()
             if isinstance(storage_metadata.state_dict_metadata.get(index.fqn), TensorStorageMetadata)
             and (wanted is None or index.fqn in wanted)]
    return sorted(items, key=lambda item: (item[1].relative_path, item[1].offset))


def find_damaged_item(ckpt_dir: str, storage_metadata, fqns: Iterable[str] | None = None):
    """``(fqn, path, offset, length, reason)`` of the first tensor item that does not parse, or None."""
    for fqn, info in _tensor_items(storage_metadata, fqns):
        path = os.path.join(ckpt_dir, info.relative_path)
        with open(path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged archive raises RuntimeError, UnpicklingError, UnicodeDecodeError...
            return fqn, path, info.offset, info.length, read_error_text(e)
    return None


def damaged_checkpoint_error(ckpt_dir: str, storage_metadata, error: BaseException, what: str = "reading",
                             fqns: Iterable[str] | None = None, scan: bool = True) -> CheckpointError:
    """One line for a failed read of ``ckpt_dir``: the damaged shard and byte range when one is found
    among ``fqns`` (default: every tensor item, i.e. the checkpoint is read once more, after a
    failure only). ``scan=False`` skips the search (ranks other than the one that prints)."""
    try:
        found = find_damaged_item(ckpt_dir, storage_metadata, fqns) if scan else None
    except OSError:
        found = None
    if found is None:
        return CheckpointError(f"{what} {ckpt_dir} failed ({read_error_text(error)})")
    fqn, path, offset, length, reason = found
    return CheckpointError(f"checkpoint shard {path} is damaged: bytes {offset}-{offset + length} "
                           f"({fqn}) do not parse ({reason})")


def non_finite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """``(NaN count, ±inf count)`` of a floating-point tensor; ``(0, 0)`` for any other dtype."""
    # A NaN or an infinity anywhere makes the sum non-finite, so a finite sum proves the tensor finite
    # in one vectorised pass (bf16 5.7 G elements/s on one core, against 0.07 for the counts below);
    # a sum that overflows merely falls through to the exact count.
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return 0, 0
    nan = int(torch.isnan(tensor).sum())
    return nan, int((~torch.isfinite(tensor)).sum()) - nan


def describe_non_finite(nan: int, inf: int) -> str:
    return " and ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if part)


def check_finite(key: str, tensor: torch.Tensor, ckpt_dir: str, region: str = "") -> None:
    """A ``CheckpointError`` naming ``key`` when ``tensor`` (read from ``ckpt_dir``) holds NaN or ±inf."""
    nan, inf = non_finite_counts(tensor)
    if nan or inf:
        raise CheckpointError(f"tensor {key}{region} of {ckpt_dir} holds non-finite values "
                              f"({describe_non_finite(nan, inf)} of {tensor.numel()}); nothing can be built from it")
