"""What one checkpoint is: architecture, saved layout, counters, growth lineage, tensors, bytes.

Reads the checkpoint's self-description (``megatron_grow.json``, or Megatron-LM's ``common.pt``
args through ``checkpoint.manifest``) and the ``torch_dist`` metadata; with ``stats=True`` it
also reads every tensor, region by region (``tools.reader``, at most ``max_bytes`` at a time),
for mean / std / absmax accumulated in float64.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable

import torch

from megatron_grow.checkpoint import io
from megatron_grow.checkpoint.integrity import describe_non_finite, non_finite_counts
from megatron_grow.checkpoint.manifest import read_checkpoint_info
from megatron_grow.checkpoint.reader import DEFAULT_MAX_BYTES, CheckpointReader
from megatron_grow.growth.operators import REGISTRY
from megatron_grow.models.params import count_params

_DISTCP_RE = re.compile(r"^__(\d+)_(\d+)\.distcp$")


def tensor_stats(reader: CheckpointReader, key: str, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """mean, std (population) and absmax of the finite elements of one stored tensor, and how many
    are NaN / ±inf (``nan``, ``inf``), read in slabs of at most ``max_bytes``. (A single NaN made
    mean and std NaN and hid itself from absmax: Python's ``max(0.0, nan)`` is 0.0.)"""
    st = reader.stored(key)
    element = st.nbytes // max(st.numel, 1)
    lead = 0  # the fewest leading dims to iterate over so that one index of them fits in max_bytes
    while lead < len(st.shape) and math.prod(st.shape[lead:]) * element > max_bytes:
        lead += 1
    count, total, total_sq, absmax, nan, inf = 0, 0.0, 0.0, 0.0, 0, 0
    for _, slab in reader.iter_slabs(key, lead_dims=lead, max_bytes=max_bytes):
        slab_nan, slab_inf = non_finite_counts(slab)
        nan, inf = nan + slab_nan, inf + slab_inf
        x = slab.double()
        if slab_nan or slab_inf:
            x = x[torch.isfinite(x)]
        count += x.numel()
        total += float(x.sum())
        total_sq += float(x.square().sum())
        if x.numel():
            absmax = max(absmax, float(x.abs().max()))
    mean = total / count if count else math.nan
    var = max(total_sq / count - mean * mean, 0.0) if count else math.nan
    return {"mean": mean, "std": math.sqrt(var), "absmax": absmax, "nan": nan, "inf": inf}


def non_finite_tensors(report: dict) -> list[str]:
    """``key (n NaN and m infinite)`` for every tensor the stats found non-finite values in."""
    return [f"{r['key']} ({describe_non_finite(r['nan'], r['inf'])})" for r in report["tensors"]
            if r.get("nan") or r.get("inf")]


def saved_writers(ckpt_dir: str) -> dict:
    """The ``__R_I.distcp`` files: how many, and how many distinct ranks wrote them."""
    ranks = set()
    files = 0
    for name in os.listdir(ckpt_dir):
        m = _DISTCP_RE.match(name)
        if m:
            files += 1
            ranks.add(int(m.group(1)))
    return {"distcp_files": files, "writer_ranks": len(ranks)}


def inspect_checkpoint(path: str, *, stats: bool = False, max_bytes: int = DEFAULT_MAX_BYTES,
                       progress: Callable[[str], None] | None = None) -> dict:
    """Everything ``megatron-grow inspect`` prints, as plain data."""

    t0 = time.perf_counter()
    reader = CheckpointReader(path, progress=progress)
    info = read_checkpoint_info(reader.ckpt_dir, reader.iteration)
    model = dataclasses.asdict(info.model) if info.model is not None else None
    params = count_params(info.model).as_dict() if info.model is not None else None
    tensors = []
    keys = sorted(reader.tensors)
    for i, key in enumerate(keys):
        st = reader.tensors[key]
        row = {"key": key, "shape": list(st.shape), "dtype": str(st.dtype).replace("torch.", ""),
               "numel": st.numel, "bytes": st.nbytes, "chunks": st.num_chunks}
        if stats:
            row.update(tensor_stats(reader, key, max_bytes))
            if progress is not None:
                progress(f"stats {i + 1}/{len(keys)}: {key} ({reader.bytes_read / 2**20:.1f} MiB read, "
                         f"{time.perf_counter() - t0:.1f}s)")
        tensors.append(row)
    non_tensor = sorted(k for k in reader.metadata.state_dict_metadata if k not in reader.tensors)
    return {
        "checkpoint": reader.ckpt_dir,
        "iteration": reader.iteration,
        "source": "megatron_grow manifest" if io.read_manifest(reader.ckpt_dir) else "Megatron-LM common.pt",
        "model": model,
        "params": params,
        "layout": info.layout,
        "saved_by": saved_writers(reader.ckpt_dir),
        "counters": info.counters,
        "lineage": info.lineage,
        "recipe_training": (info.recipe or {}).get("training"),
        "tensors": tensors,
        "non_tensor_entries": len(non_tensor),
        "tensor_bytes": sum(t["bytes"] for t in tensors),
        "total_bytes": io.checkpoint_bytes(reader.ckpt_dir),
        "stats_bytes_read": reader.bytes_read,
    }


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit} ({int(n):,})"
    return f"{int(n):,}"


def describe_growth(record: dict) -> str:
    """One line per lineage record: operators with their factors, noise, seed, source, size, time."""
    parts = []
    for op in record.get("operators") or []:
        cfg = record.get(op) or {}
        parts.append(REGISTRY[op].describe(cfg) if op in REGISTRY else str(op))
    src = f"{record.get('source_path')} @ iteration {record.get('source_iteration')}"
    before, after = record.get("params_before"), record.get("params_after")
    size = f"params {_count(before)} -> {_count(after)}"
    if before and after:
        size += f" ({after / before:.2f}x)"
    return (f"{' then '.join(parts) or '(no operators)'}; seed {record.get('seed')}, optimizer "
            f"{record.get('optimizer')}; from {src}; {size}; source FLOPs "
            f"{float(record.get('source_flops_so_far') or 0):.4g}; at {record.get('time')}")


def format_inspect(report: dict) -> str:
    lines = [f"checkpoint   {report['checkpoint']}", f"iteration    {report['iteration']}",
             f"described by {report['source']}"]
    m, p = report["model"], report["params"]
    if m:
        lines.append(f"architecture {m['num_layers']} layers, hidden {m['hidden_size']}, heads "
                     f"{m['num_attention_heads']} (groups {m['num_query_groups']}, head dim {m['kv_channels']}), "
                     f"experts {m['num_moe_experts']} top-{m['moe_router_topk']}, expert FFN "
                     f"{m['moe_ffn_hidden_size']}, vocab {m['vocab_size']}, seq {m['seq_length']}, "
                     f"{m['normalization']}{', qk-norm' if m.get('qk_layernorm') else ''}"
                     f"{', SwiGLU' if m.get('gated_linear_unit') else ''}")
        lines.append(f"params       total {_count(p['total'])}, activated {_count(p['activated'])} "
                     f"(paper's count, both embeddings)")
    else:
        lines.append("architecture unknown (no manifest and no Megatron-LM args)")
    lay = report["layout"]
    lay_text = "  ".join(f"{k} {v}" for k, v in lay.items()) if lay else "not recorded"
    w = report["saved_by"]
    lines.append(f"saved with   {lay_text}  ({w['distcp_files']} .distcp files from {w['writer_ranks']} ranks)")
    c = report["counters"]
    lines.append(f"counters     iteration {c.get('iteration')}, samples {c.get('consumed_samples'):,}, tokens "
                 f"{c.get('consumed_tokens'):,}, FLOPs so far {float(c.get('flops_so_far') or 0):.4g}, sunk "
                 f"(before the latest growth) {float(c.get('sunk_flops') or 0):.4g}")
    t = report.get("recipe_training")
    if t:
        lines.append(f"schedule     {t.get('lr_decay_style')} lr {t.get('lr')} train_iters {t.get('train_iters')} "
                     f"warmup {t.get('lr_warmup_iters')} wsd decay {t.get('lr_wsd_decay_iters')}")
    if report["lineage"]:
        lines.append(f"lineage      {len(report['lineage'])} growth(s), oldest first:")
        for i, rec in enumerate(report["lineage"], 1):
            lines.append(f"  {i}. {describe_growth(rec)}")
    else:
        lines.append("lineage      none (never grown)")
    has_stats = report["tensors"] and "mean" in report["tensors"][0]
    kw = max((len(r["key"]) for r in report["tensors"]), default=10)
    head = f"  {'tensor':<{kw}}  {'shape':<20} {'dtype':<9} {'bytes':>12}"
    if has_stats:
        head += f"  {'mean':>11} {'std':>11} {'absmax':>11}"
    lines += [f"tensors      {len(report['tensors'])} ({report['non_tensor_entries']} non-tensor entries)", head]
    for r in report["tensors"]:
        row = f"  {r['key']:<{kw}}  {str(tuple(r['shape'])):<20} {r['dtype']:<9} {r['bytes']:>12,}"
        if has_stats:
            row += f"  {r['mean']:>11.4e} {r['std']:>11.4e} {r['absmax']:>11.4e}"
            if r["nan"] or r["inf"]:
                row += f"  NON-FINITE: {describe_non_finite(r['nan'], r['inf'])} (stats of the finite rest)"
        lines.append(row)
    lines.append(f"bytes        tensors {report['tensor_bytes']:,}; on disk {report['total_bytes']:,} "
                 f"({report['total_bytes'] / 2**20:.2f} MiB)")
    return "\n".join(lines)


__all__ = ["inspect_checkpoint", "format_inspect", "tensor_stats", "describe_growth", "saved_writers",
           "non_finite_tensors"]
