"""Hugging Face checkpoint files: read slices of (sharded) safetensors, write shards progressively.

Layout (``save_pretrained``): ``config.json`` plus either ``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` (``weight_map``:
tensor name -> file). ``safe_open`` validates each file; a block of whole rows is then read with
one ``readinto`` at the offset its header gives (page-cache speed; reading through safetensors'
memory map faults the pages in one by one, several times slower), any other slice through
``get_slice(name)[rows, cols]``. Only the requested bytes are read; nothing loads a whole file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Sequence

import torch

from megatron_grow.checkpoint import paths
from megatron_grow.errors import InteropError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Files a tokenizer may consist of (copied along with exported weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
                   "chat_template.jinja")


def read_hf_config(hf_dir: str) -> dict:
    """An HF model directory's ``config.json``.

    Args:
        hf_dir: the model directory (``--hf-dir``).

    Returns:
        The parsed config.

    Raises:
        InteropError: not a directory, no ``config.json``, or unreadable.
    """
    path = os.path.join(hf_dir, CONFIG_NAME)
    if not os.path.isdir(hf_dir):
        raise InteropError(f"--hf-dir {hf_dir} is not a directory")
    if not os.path.isfile(path):
        raise InteropError(f"{hf_dir} has no {CONFIG_NAME}: not a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InteropError(f"{path} is unreadable: {e}") from None


# safetensors' dtype names (the header's ``dtype`` field) -> torch.
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _read_into(f, offset: int, buf: memoryview) -> int:
    """Bytes read into ``buf`` from ``offset`` of raw file ``f``; fewer only at the end of the file
    (one ``read`` returns at most ~2 GiB on Linux, so it loops)."""
    done = 0
    while done < len(buf):
        n = os.preadv(f.fileno(), [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


class SafetensorsCheckpoint:
    """Lazy, sliced access to the tensors of one HF model directory."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    self.weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise InteropError(f"{index} is unreadable or has no weight_map: {e}") from None
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_NAME)):
            self.weight_map = {}
            with self._open(SINGLE_NAME) as f:
                self.weight_map = {name: SINGLE_NAME for name in f.keys()}
        else:
            raise InteropError(f"{hf_dir} has neither {INDEX_NAME} nor {SINGLE_NAME}")
        for rel in sorted(set(self.weight_map.values())):
            if not os.path.isfile(os.path.join(hf_dir, rel)):
                raise InteropError(f"safetensors shard missing: {os.path.join(hf_dir, rel)} (named in {INDEX_NAME})")
        self._handles: dict[str, object] = {}
        self._files: dict[str, tuple] = {}  # rel -> (open file, data start, header)
        self.bytes_read = 0  # the stored bytes ``read`` returned (before any dtype conversion)

    def _open(self, rel: str):
        from safetensors import safe_open  # lazy: optional dependency (the hf extra)

        path = os.path.join(self.hf_dir, rel)
        try:
            return safe_open(path, framework="pt")
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise InteropError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise InteropError(f"tensor {name} is missing from {self.hf_dir}")
        rel = self.weight_map[name]
        if rel not in self._handles:
            self._handles[rel] = self._open(rel).__enter__()
        return self._handles[rel]

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of HF tensor ``name`` (from the file header; no data read).

        Args:
            name: an HF tensor name.

        Returns:
            Its shape.
        """
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, region: Sequence[slice]) -> torch.Tensor:
        """``tensor[region]`` (one slice per leading dim), reading only those bytes.

        Args:
            name: an HF tensor name.
            region: one slice per leading dim.

        Returns:
            The region, in the stored dtype.

        Raises:
            InteropError: the read fails.
        """
        try:
            value = self._read_rows(name, tuple(region))
            if value is None:
                value = self._handle(name).get_slice(name)[tuple(region)]
            self.bytes_read += value.numel() * value.element_size()
            return value
        except InteropError:
            raise
        except Exception as e:
            raise InteropError(f"reading {name} from {self.hf_dir} failed ({type(e).__name__}: {e})") from None

    def _read_rows(self, name: str, region: tuple) -> torch.Tensor | None:
        """``region`` read with one ``readinto`` when it is a block of whole rows of a tensor in a dtype
        torch names; None otherwise (the caller slices through safetensors)."""
        self._handle(name)  # safe_open validates the file first
        f, data_start, header = self._file(self.weight_map[name])
        entry = header[name]
        dtype, shape = SAFETENSORS_DTYPES.get(entry["dtype"]), tuple(entry["shape"])
        if dtype is None or not shape or len(region) > len(shape):
            return None
        full = all(r == slice(None) or r.indices(n) == (0, n, 1) for r, n in zip(region[1:], shape[1:]))
        start, stop, step = (region[0].indices(shape[0]) if region else (0, shape[0], 1))
        if not full or step != 1:
            return None
        out = torch.empty((max(stop - start, 0),) + shape[1:], dtype=dtype)
        nbytes = out.numel() * out.element_size()
        row_bytes = math.prod(shape[1:]) * out.element_size()
        offset = data_start + entry["data_offsets"][0] + start * row_bytes
        if nbytes:
            got = _read_into(f, offset, memoryview(out.view(-1).view(torch.uint8).numpy()))
            if got != nbytes:
                path = os.path.join(self.hf_dir, self.weight_map[name])
                raise InteropError(f"{path} is truncated: tensor {name} needs bytes {offset}-{offset + nbytes}, "
                                   f"the file ends at {offset + got}")
        return out

    def close(self) -> None:
        """Close the files ``read`` opened (also when the object goes)."""
        for f, _, _ in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self) -> None:
        if getattr(self, "_files", None):
            self.close()

    def _file(self, rel: str) -> tuple:
        """The open file, where its data begins, and its parsed header (safetensors' own layout: an
        8-byte little-endian header length, the JSON header, then the data)."""
        if rel not in self._files:
            path = os.path.join(self.hf_dir, rel)
            f = open(path, "rb", buffering=0)  # noqa: SIM115  (kept open for the reads: close())
            (length,) = struct.unpack("<Q", f.read(8))
            self._files[rel] = (f, 8 + length, json.loads(f.read(length)))
        return self._files[rel]

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype of HF tensor ``name`` (from the file header), None for one torch has no name for."""
        return SAFETENSORS_DTYPES.get(self._handle(name).get_slice(name).get_dtype())

    def weights_dtype(self) -> torch.dtype | None:
        """The dtype most of the stored tensors have (the model's weights dtype; a few, such as DeepSeek's
        ``e_score_correction_bias``, may be stored in fp32 beside bf16 weights)."""
        counts: dict = {}
        for name in self.weight_map:
            dtype = self.dtype(name)
            counts[dtype] = counts.get(dtype, 0) + 1
        return max(counts, key=counts.get) if counts else None

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every tensor the model needs must be present with the shape config.json implies.

        Args:
            expected: ``{HF tensor name: shape}`` (``tensor_map.hf_tensor_shapes``).

        Raises:
            InteropError: naming the first tensor whose shape differs.
        """
        for name, shape in expected.items():
            got = self.shape(name)
            if got != tuple(shape):
                raise InteropError(f"shape mismatch: {name} is {got} in {self.hf_dir}, config.json implies "
                                   f"{tuple(shape)}")


class ShardedSafetensorsWriter:
    """Writes planned tensors into numbered shard files as each shard completes.

    ``plan``: ``[(name, shape, dtype)]`` in the order tensors will be added. Shards are cut at
    ``max_shard_bytes``; at most one shard's tensors are held in memory. Everything goes to a
    staging directory that replaces ``out_dir`` only in :meth:`finish`.
    """

    def __init__(self, out_dir: str, plan: list[tuple[str, tuple, torch.dtype]], max_shard_bytes: int):
        self.out_dir = os.path.abspath(out_dir)
        self.staging = f"{self.out_dir}.incomplete-{uuid.uuid4().hex[:8]}"
        os.makedirs(self.staging)
        self.shard_of: dict[str, int] = {}
        sizes, current, index = [], 0, 0
        for name, shape, dtype in plan:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if current and current + nbytes > max_shard_bytes:
                sizes.append(current)
                index, current = index + 1, 0
            self.shard_of[name] = index
            current += nbytes
        sizes.append(current)
        self.num_shards = len(sizes)
        self.total_bytes = sum(sizes)
        self.remaining = [sum(1 for i in self.shard_of.values() if i == s) for s in range(self.num_shards)]
        self.buffers: list[dict] = [{} for _ in range(self.num_shards)]
        self.dtypes = {name: dtype for name, _, dtype in plan}

    def filename(self, shard: int) -> str:
        """The file name of shard ``shard`` (0-based), as ``save_pretrained`` names them.

        Args:
            shard: the shard index.

        Returns:
            ``model.safetensors`` for a single shard, else ``model-0000N-of-0000M.safetensors``.
        """
        if self.num_shards == 1:
            return SINGLE_NAME
        return f"model-{shard + 1:05d}-of-{self.num_shards:05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Hold ``tensor`` (converted to its planned dtype) and write its shard once the shard is full.

        Args:
            name: a planned HF tensor name.
            tensor: its values.
        """
        from safetensors.torch import save_file  # lazy: optional dependency (the hf extra)

        s = self.shard_of[name]
        self.buffers[s][name] = tensor.to(self.dtypes[name]).contiguous().clone()
        self.remaining[s] -= 1
        if self.remaining[s] == 0:
            save_file(self.buffers[s], os.path.join(self.staging, self.filename(s)), metadata={"format": "pt"})
            self.buffers[s] = {}

    def write_json(self, name: str, obj: dict) -> None:
        """Write ``obj`` as ``name`` in the staging directory.

        Args:
            name: the file name (e.g. ``config.json``).
            obj: the JSON-ready content.
        """
        with open(os.path.join(self.staging, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)

    def copy_in(self, path: str) -> None:
        """Copy a file (e.g. a tokenizer file) into the staging directory.

        Args:
            path: the file to copy; it keeps its base name.
        """
        shutil.copy2(path, os.path.join(self.staging, os.path.basename(path)))

    def finish(self, overwrite: bool) -> str:
        """Write the shard index and move the staging directory into place.

        Args:
            overwrite: replace an ``out_dir`` that appeared during the export.

        Returns:
            The final directory.

        Raises:
            InteropError: a shard was never filled, or ``out_dir`` appeared and ``overwrite`` is false.
        """
        unwritten = [self.filename(s) for s, n in enumerate(self.remaining) if n]
        if unwritten:
            raise InteropError(f"export incomplete: shards {unwritten} were never filled")
        if self.num_shards > 1:
            self.write_json(INDEX_NAME, {"metadata": {"total_size": self.total_bytes},
                                         "weight_map": {n: self.filename(s) for n, s in self.shard_of.items()}})
        if os.path.exists(self.out_dir) and not overwrite:
            raise InteropError(f"{self.out_dir} appeared during the export; not replacing it")
        paths.fsync_tree(self.staging)
        paths.replace_dir(self.staging, self.out_dir)  # an old --hf-dir goes only once the new one is whole
        return self.out_dir

    def abort(self) -> None:
        """Remove the staging directory (the export failed); ``out_dir`` is untouched."""
        shutil.rmtree(self.staging, ignore_errors=True)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
