"""Our ``torch_dist`` checkpoint (any layout it was saved in) -> Hugging Face safetensors + config.json.

One plain process, no torch.distributed: tensors are read region by region with the checkpoint
region reader (one layer's attention/norm/router tensors, then one expert at a time), turned
into HF tensors and handed to a shard writer that writes each ``model-0000i-of-0000n.safetensors``
as soon as its tensors are complete. Peak memory is about one layer's non-expert tensors plus
one shard. The output directory appears only when complete.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from tqdm import tqdm

from megatron_grow.checkpoint import io, keys, paths
from megatron_grow.checkpoint.integrity import describe_non_finite, non_finite_counts
from megatron_grow.checkpoint.manifest import read_checkpoint_info
from megatron_grow.checkpoint.reader import CheckpointReader
from megatron_grow.config.schema import ModelConfig, moe_layer_pattern
from megatron_grow.errors import InteropError
from megatron_grow.interop.hf import tensor_map
from megatron_grow.interop.hf.families import family_by_name, family_for_model
from megatron_grow.interop.hf.families.base import Family
from megatron_grow.interop.hf.safetensors_io import TOKENIZER_FILES, ShardedSafetensorsWriter

DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Token ids an imported model's config.json carries that our manifest has no field for.
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_origin(ckpt_dir: str, depth: int = 8) -> dict | None:
    """The ``hf_import`` record of this checkpoint or, through the growth lineage, of its ancestors.

    Args:
        ckpt_dir: an ``iter_NNNNNNN`` directory.
        depth: how many lineage steps to follow at most.

    Returns:
        The record (``hf_dir``, ``architecture``, ...), or None when no ancestor came from HF.
    """
    manifest = io.read_manifest(ckpt_dir)
    if manifest.get("hf_import"):
        return manifest["hf_import"]
    for record in reversed(manifest.get("lineage", [])):
        src = record.get("source_path")
        if depth > 0 and src and os.path.isdir(src):
            try:
                parent, _ = paths.resolve_checkpoint_dir(src, record.get("source_iteration"))
            except Exception:
                continue
            found = hf_origin(parent, depth - 1)
            if found:
                return found
    return None


def _check_stored(reader: CheckpointReader, item: tensor_map.Item) -> None:
    lead = item.lead
    st = reader.stored(item.key)
    if len(st.shape) != len(lead) + len(item.shape) or st.shape[len(lead):] != item.shape:
        unit = "expert" if item.expert is not None else "layer" if item.layer is not None else "tensor"
        raise InteropError(f"shape mismatch: {item.key} is {st.shape} in {reader.ckpt_dir}; the recorded "
                           f"architecture implies {item.shape} per {unit}")


def _read_item(reader: CheckpointReader, item: tensor_map.Item) -> torch.Tensor:
    lead = item.lead
    offsets = lead + (0,) * len(item.shape)
    sizes = (1,) * len(lead) + item.shape
    return reader.read(item.key, offsets, sizes).reshape(item.shape)


def _constant_tensors(model: ModelConfig, family: Family) -> dict[tuple, dict[str, torch.Tensor]]:
    """Per group, HF tensors with no MCore counterpart that are exactly zero (see glm4_moe)."""
    n, H, E = family.naming, model.hidden_size, model.num_moe_experts
    out: dict[tuple, dict] = {}
    for layer, is_moe in enumerate(moe_layer_pattern(model)):
        p, extra = f"model.layers.{layer}.", {}
        if not is_moe:
            continue  # a dense layer has neither router nor shared expert
        if n.router_bias and not model.moe_router_enable_expert_bias:
            extra[p + n.router_bias] = torch.zeros(E)  # no bias = a zero bias
        if n.always_write_shared_expert and not model.moe_shared_expert_intermediate_size:
            sp = f"{p}{n.shared_expert}."
            extra.update({sp + "gate_proj.weight": torch.zeros(0, H), sp + "up_proj.weight": torch.zeros(0, H),
                          sp + "down_proj.weight": torch.zeros(H, 0)})
        if extra:
            out[(layer, -1)] = extra
    return out


def plan_export(model: ModelConfig, family: Family, reader: CheckpointReader):
    """What an export reads and writes, group by group (non-layer tensors, each layer, each expert).

    Args:
        model: the checkpoint's architecture.
        family: the HF class to write.
        reader: the checkpoint.

    Returns:
        ``(groups, names, sources, constants)``: ``{group: [items]}`` in order, the HF names each group
        completes, the HF sources (``tensor_map.hf_sources``) and tensors with constant values.
    """
    padded = reader.stored(keys.EMBEDDING).shape[0]
    items = []
    for it in tensor_map.all_items(model, family, padded):
        if it.key == keys.OUTPUT_LAYER and not model.untie_embeddings_and_output_weights \
                and it.key not in reader:
            continue  # tied: transformers ties lm_head to the embedding
        _check_stored(reader, it)
        items.append(it)
    sources = tensor_map.hf_sources(items)
    groups: dict[tuple, list] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    names: dict[tuple, list[str]] = {g: [] for g in groups}
    for name, parts in sources.items():
        owner = {p[1].group for p in parts}
        if len(owner) != 1:
            raise InteropError(f"internal: {name} spans several export groups {sorted(owner)}")
        names[owner.pop()].append(name)
    return groups, names, sources, _constant_tensors(model, family)


def _hf_config(model: ModelConfig, family: Family, fields: dict, dtype: torch.dtype, origin: dict | None) -> dict:
    cfg = dict(fields)
    cfg.update(architectures=[family.architecture], model_type=family.model_type, dtype=_DTYPE_NAMES[dtype])
    if origin and origin.get("config"):
        src = origin["config"]
        cfg["max_position_embeddings"] = max(model.seq_length, int(src.get("max_position_embeddings") or 0))
        for key in _TOKEN_KEYS:
            if key in src and (src[key] is None or (isinstance(src[key], int) and src[key] < model.vocab_size)):
                cfg[key] = src[key]
    return cfg


def _choose_family(model, architecture: str | None, origin: dict | None):
    """The family to write (``--architecture``, else the class the checkpoint came from, else the first that
    fits) and its config fields."""
    if architecture:
        family = family_by_name(architecture)
        return family, family.write_config(model)
    return family_for_model(model, (origin or {}).get("architecture"))


def _copy_tokenizer(writer: ShardedSafetensorsWriter, tokenizer: str | None, origin_dir: str | None) -> list[str]:
    """Copy the tokenizer files of ``--tokenizer`` (else of the HF directory imported from) in; their names."""
    tok_dir = tokenizer or origin_dir
    if tokenizer and not os.path.isdir(tokenizer):
        raise InteropError(f"--tokenizer {tokenizer} is not a directory")
    copied = []
    if tok_dir and os.path.isdir(tok_dir):
        for fname in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tok_dir, fname)):
                writer.copy_in(os.path.join(tok_dir, fname))
                copied.append(fname)
    return copied


def _check_finite(values: dict, group_items: list, ckpt_dir: str) -> None:
    """A model with NaN or ±inf weights exported as HF loads without complaint and only yields NaN
    logits; refuse it here, naming the tensor (``--allow-nonfinite`` writes it anyway)."""
    for it in group_items:
        nan, inf = non_finite_counts(values[(it.key, it.group)])
        if nan or inf:
            indices = (("layer", it.layer), ("expert", it.expert))
            where = ", ".join(f"{name} {i}" for name, i in indices if i is not None)
            raise InteropError(f"tensor {it.key} ({where or 'not per layer'}) of {ckpt_dir} holds "
                               f"non-finite values ({describe_non_finite(nan, inf)}); not exported "
                               "(--allow-nonfinite writes it anyway)")


def export_hf(load: str, hf_dir: str, *, architecture: str | None = None, dtype: str = "auto",
              tokenizer: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              overwrite: bool = False, progress: bool = True, allow_nonfinite: bool = False) -> dict:
    """Write checkpoint ``load`` as a Hugging Face model directory (one process, sharded safetensors).

    Args: ``load`` (run root or ``iter_N``), ``hf_dir`` (appears only once complete), ``architecture`` (default:
    the class it came from, else the first that fits), ``dtype`` (``auto``: as stored), ``tokenizer`` (files to copy
    in), ``max_shard_bytes``, ``overwrite`` (replace ``hf_dir``), ``progress``, ``allow_nonfinite`` (write NaN/±inf
    tensors; by default one is refused, naming it, with nothing written). Returns: a summary (checkpoint,
    hf_dir, architecture, tensors, shards, bytes written and read, dtype, tokenizer files, seconds).
    """
    t0 = time.perf_counter()
    # --hf-dir may not be, hold or lie inside what is read: --overwrite would replace it.
    paths.check_destination(hf_dir, "--hf-dir", [("the checkpoint", load), ("the --tokenizer directory", tokenizer)],
                            InteropError)
    ckpt_dir, iteration = paths.resolve_checkpoint_dir(load)
    info = read_checkpoint_info(ckpt_dir, iteration)
    if info.model is None:
        raise InteropError(f"{ckpt_dir} does not record its architecture (no megatron_grow.json model section)")
    model = info.model
    origin = hf_origin(ckpt_dir)
    family, fields = _choose_family(model, architecture, origin)
    if os.path.exists(hf_dir) and (not os.path.isdir(hf_dir) or os.listdir(hf_dir)) and not overwrite:
        raise InteropError(f"--hf-dir {hf_dir} exists and is not empty; pass --overwrite to replace it")
    reader = CheckpointReader(ckpt_dir)
    groups, names, sources, constants = plan_export(model, family, reader)
    out_dtype = reader.stored(keys.EMBEDDING).dtype if dtype == "auto" else DTYPES[dtype]
    shapes = tensor_map.hf_tensor_shapes([it for its in groups.values() for it in its])
    plan = []
    for g in groups:
        plan += [(name, shapes[name], out_dtype) for name in names[g]]
        plan += [(name, tuple(t.shape), out_dtype) for name, t in constants.get(g, {}).items()]
    writer = ShardedSafetensorsWriter(hf_dir, plan, max_shard_bytes)
    try:
        bar = tqdm(groups.items(), desc="export-hf", unit="group", file=sys.stderr, disable=not progress)
        for g, group_items in bar:
            values = {(it.key, it.group): _read_item(reader, it) for it in group_items}
            if not allow_nonfinite:
                _check_finite(values, group_items, ckpt_dir)
            for name in names[g]:
                parts = [values[(it.key, it.group)][row:row + rows] for _, it, row, rows in sources[name]]
                writer.add(name, torch.cat(parts) if len(parts) > 1 else parts[0])
            for name, t in constants.get(g, {}).items():
                writer.add(name, t)
        writer.write_json("config.json", _hf_config(model, family, fields, out_dtype, origin))
        copied = _copy_tokenizer(writer, tokenizer, (origin or {}).get("hf_dir"))
        final = writer.finish(overwrite)
    except BaseException:
        writer.abort()
        raise
    return {"checkpoint": ckpt_dir, "hf_dir": final, "architecture": family.architecture,
            "tensors": len(plan), "shards": writer.num_shards, "bytes_written": writer.total_bytes,
            "bytes_read": reader.bytes_read, "dtype": _DTYPE_NAMES[out_dtype], "tokenizer_files": copied,
            "seconds": time.perf_counter() - t0}
