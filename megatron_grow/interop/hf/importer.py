"""Hugging Face safetensors -> our ``torch_dist`` checkpoint, in any target layout (collective).

Every rank builds its part of the target model (``initialize=False``: no init work), takes the
model's own sharded state dict (so the layout, TP/EP sharding and SwiGLU splitting are
Megatron-Core's), and fills each local slice from the HF files with ``get_slice`` reads of just
those rows and columns. No rank ever holds more than its own model part plus one slice; the
model is then saved atomically through ``dist_checkpointing`` with our manifest.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from megatron.core.dist_checkpointing.mapping import apply_factories
from tqdm import tqdm

from megatron_grow.checkpoint import io, keys, paths
from megatron_grow.checkpoint.architecture import model_config_from_dict
from megatron_grow.checkpoint.fill_check import poison_parameters, verify_all_sourced
from megatron_grow.checkpoint.integrity import describe_non_finite, non_finite_counts
from megatron_grow.checkpoint.manifest import build_manifest, empty_counters
from megatron_grow.checkpoint.megatron_args import common_state
from megatron_grow.config.layout_rules import model_layout_problems, padded_vocab_size
from megatron_grow.config.schema import ModelConfig, ParallelConfig
from megatron_grow.errors import InteropError
from megatron_grow.interop.hf import tensor_map
from megatron_grow.interop.hf.families import family_for_hf_config
from megatron_grow.interop.hf.families.base import Family, check_layers_beyond_the_stack
from megatron_grow.interop.hf.safetensors_io import SafetensorsCheckpoint, read_hf_config
from megatron_grow.models.builder import build_model_chunks
from megatron_grow.parallel.collectives import rank
from megatron_grow.parallel.init import initialize_distributed

# ``import-hf --dtype``: the checkpoint's weights dtype (``auto``: bf16 for bf16 files, else fp32).
IMPORT_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


def model_from_hf_config(hf: dict, family: Family, where: str, seq_length: int | None = None) -> ModelConfig:
    """Our ``ModelConfig`` for an HF ``config.json``, read by its family and checked like a recipe.

    Args:
        hf: the ``config.json`` dict.
        family: its family (``families.family_for_hf_config``).
        where: the file, named in every refusal.
        seq_length: ``model.seq_length`` to record (default: the family's choice).

    Returns:
        The model configuration.

    Raises:
        InteropError: a setting with no exact equivalent; ConfigError: the result is not a valid model.
    """
    fields = family.read_config(hf, where)
    if seq_length:
        fields["seq_length"] = seq_length
    return model_config_from_dict(fields, where)


def describe_hf_model(hf_dir: str, seq_length: int | None = None) -> tuple[dict, Family, ModelConfig]:
    """(config.json, family, our ModelConfig) for an HF directory; all refusals happen here.

    Args:
        hf_dir: the HF model directory.
        seq_length: ``model.seq_length`` to record.

    Returns:
        ``(hf config, family, model)``.
    """
    hf = read_hf_config(hf_dir)
    where = os.path.join(hf_dir, "config.json")
    family = family_for_hf_config(hf, where)
    return hf, family, model_from_hf_config(hf, family, where, seq_length)


def read_region(item: tensor_map.Item, offsets: tuple, sizes: tuple, ckpt: SafetensorsCheckpoint,
                dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The region ``[offsets, offsets + sizes)`` of one item, read from the HF files.

    Args:
        item: one layer's (or expert's) slice of a stored tensor (``tensor_map.Item``).
        offsets: the region's start within the item, per dim.
        sizes: the region's size, per dim.
        ckpt: the HF files.
        dtype: the dtype of the result.
        out: where to write it (shape ``sizes``, dtype ``dtype``); default a new tensor.

    Returns:
        The region (rows past the real vocabulary are zeros).
    """
    out = torch.empty(sizes, dtype=dtype) if out is None else out
    r0, n = offsets[0], sizes[0]
    rest = tuple(slice(o, o + s) for o, s in zip(offsets[1:], sizes[1:]))
    row = 0
    for pc in item.pieces:
        a, b = max(row, r0), min(row + pc.rows, r0 + n)
        if a < b:
            if pc.hf_name is None:
                out[a - r0:b - r0] = 0
            else:
                rows = slice(pc.hf_row + a - row, pc.hf_row + b - row)
                value = ckpt.read(pc.hf_name, (rows,) + rest)
                _check_finite(pc.hf_name, value, ckpt)
                out[a - r0:b - r0] = value.to(dtype)
        row += pc.rows
    if row != item.shape[0]:
        raise InteropError(f"internal: pieces of {item.key} cover {row} rows, the tensor has {item.shape[0]}")
    return out


def _check_finite(hf_name: str, value: torch.Tensor, ckpt: SafetensorsCheckpoint) -> None:
    """NaN or ±inf in an HF tensor is named here; the poisoned-parameter check after the fill
    would otherwise report that tensor as "not sourced"."""
    nan, inf = non_finite_counts(value)
    if nan or inf:
        path = os.path.join(ckpt.hf_dir, ckpt.weight_map.get(hf_name, "?"))
        raise InteropError(f"tensor {hf_name} in {path} holds non-finite values ({describe_non_finite(nan, inf)}); "
                           "nothing can be imported from it")


def _item_of(st, index: dict) -> tensor_map.Item:
    per_layer = keys.split_per_layer_key(st.key)  # a mixed stack: the key names the layer, experts on axis 0
    lead = ((per_layer[0],) if per_layer else ()) + tuple(st.global_offset[:st.prepend_axis_num])
    layer = lead[0] if lead else None
    expert = lead[1] if len(lead) >= 2 else None
    item = index.get((st.key, layer, expert))
    if item is None:
        raise InteropError(f"the model has tensor {st.key} (layer {layer}, expert {expert}) that the "
                           "Hugging Face mapping does not provide")
    return item


@torch.no_grad()
def fill_from_hf(model_chunks, model: ModelConfig, family: Family, ckpt: SafetensorsCheckpoint,
                 tp: int, progress: bool = True) -> int:
    """Fill this rank's model chunks from the HF files (only the slices this rank holds).

    Args:
        model_chunks: this rank's model chunks.
        model: their architecture.
        family: the HF class.
        ckpt: the HF files.
        tp: the tensor-parallel size (for the padded vocabulary).
        progress: show a progress bar.

    Returns:
        The bytes this rank read from the files (in their stored dtype).
    """
    items = tensor_map.all_items(model, family, padded_vocab_size(model, tp))
    index = {(it.key, it.layer, it.expert): it for it in items}
    sd = io.model_sharded_state_dict(model_chunks)
    apply_factories(sd)
    tensors = list(io.iter_sharded_tensors(sd))
    poisoned = poison_parameters(model_chunks, written_in_full=[st.data for st in tensors])
    read_before = ckpt.bytes_read
    bar = tqdm(tensors, desc="import-hf", unit="tensor", file=sys.stderr, disable=not progress or rank() != 0)
    for st in bar:
        item = _item_of(st, index)
        offsets = tuple(st.global_offset[st.prepend_axis_num:])
        read_region(item, offsets, tuple(st.local_shape), ckpt, st.data.dtype, out=st.data)
    verify_all_sourced(model_chunks, poisoned)
    return ckpt.bytes_read - read_before  # as stored in the files, not as converted


def import_dtype(dtype: str, ckpt: SafetensorsCheckpoint) -> torch.dtype:
    """The imported weights' dtype for ``import-hf --dtype`` (``IMPORT_DTYPES``)."""
    if dtype not in IMPORT_DTYPES:
        raise InteropError(f"--dtype {dtype!r} is not one of {', '.join(IMPORT_DTYPES)}")
    if dtype != "auto":
        return IMPORT_DTYPES[dtype]
    return torch.bfloat16 if ckpt.weights_dtype() == torch.bfloat16 else torch.float32


def _check_destination(save: str, overwrite: bool) -> None:
    if os.path.exists(save) and not os.path.isdir(save):
        raise InteropError(f"--save {save} exists and is not a directory")
    if os.path.isdir(save) and os.listdir(save) and not overwrite:
        raise InteropError(f"--save {save} exists and is not empty; pass --overwrite to replace it")


def import_hf(hf_dir: str, save: str, parallel: ParallelConfig, *, seq_length: int | None = None,
              overwrite: bool = False, progress: bool = True, seed: int = 1234, dtype: str = "auto",
              drop_mtp: bool = False) -> dict:
    """Convert ``hf_dir`` into a checkpoint under ``save`` laid out as ``parallel`` (collective).

    Args:
        hf_dir: the HF model directory (``config.json`` + safetensors).
        save: the destination checkpoint root.
        parallel: the layout of the checkpoint to write.
        seq_length: ``model.seq_length`` to record.
        overwrite: write into a non-empty ``save``.
        progress: show a progress bar.
        seed: the seed of the model's (poisoned, then filled) initialisation.
        dtype: the checkpoint's weights dtype (``IMPORT_DTYPES``); ``auto``: bf16 when the HF weights are
            stored in bf16, else fp32 (so a bf16 model imports and exports back byte for byte).
        drop_mtp: import without the multi-token-prediction layers the files hold past the stack (refused
            otherwise: ``families.base.check_layers_beyond_the_stack``).

    Returns:
        A summary: ``hf_dir``, ``architecture``, ``checkpoint``, ``model``, ``world_size``, ``layout``,
        ``bytes_read`` (all ranks), ``seconds``, ``tracker``.
    """
    t0 = time.perf_counter()
    paths.check_destination(save, "--save", [("the --hf-dir model", hf_dir)], InteropError)
    hf, family, model = describe_hf_model(hf_dir, seq_length)
    ckpt = SafetensorsCheckpoint(hf_dir)
    dropped = check_layers_beyond_the_stack(hf, ckpt.weight_map, os.path.join(hf_dir, "config.json"), drop_mtp)
    tp = parallel.tensor_model_parallel_size
    ckpt.check_shapes(tensor_map.hf_tensor_shapes(tensor_map.all_items(model, family, padded_vocab_size(model, tp))))
    problems = model_layout_problems(model, parallel)
    if problems:
        raise InteropError("target layout does not fit the model: " + "; ".join(problems))
    _check_destination(save, overwrite)
    ctx = initialize_distributed(parallel, seed=seed)
    params_dtype = import_dtype(dtype, ckpt)
    # every weight comes from the HF files
    chunks = build_model_chunks(model, parallel, initialize=False, params_dtype=params_dtype)
    nbytes = fill_from_hf(chunks, model, family, ckpt, tp, progress)
    counters = empty_counters()
    manifest = build_manifest(model=model, layout=ctx.layout.as_record(),
                              counters=counters, lineage=[])
    manifest["hf_import"] = {"hf_dir": os.path.abspath(hf_dir), "architecture": family.architecture,
                             "config": hf}
    manifest = io.broadcast_object(manifest)
    state = io.model_sharded_state_dict(chunks)
    state.update(common_state(counters, manifest))
    final = io.save_checkpoint(save, counters["iteration"], state, manifest)
    totals = torch.tensor([nbytes], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return {"hf_dir": hf_dir, "architecture": family.architecture, "checkpoint": final,
            "model": model, "world_size": ctx.world_size,
            "layout": f"TP={ctx.layout.tp} PP={ctx.layout.pp} EP={ctx.layout.ep} DP={ctx.layout.dp}",
            "bytes_read": int(totals.item()), "seconds": time.perf_counter() - t0,
            "tracker": paths.TRACKER_FILENAME, "dropped_layers": dropped}
