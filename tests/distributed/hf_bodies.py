"""Bodies of the Hugging Face interop tests that run inside gloo processes (spawn imports them)."""

from __future__ import annotations

import os

from megatron_grow.checkpoint.reader import CheckpointReader
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.interop.hf.exporter import export_hf
from megatron_grow.interop.hf.importer import import_hf
from tests.distributed.bodies import load_forward

SEQ = 32


def _logits(result):
    if result is None:
        return None
    return result["logits"]


def import_forward(hf_dir: str, root: str, parallel: ParallelConfig):
    """Import ``hf_dir`` into ``root`` laid out as ``parallel``; our logits on the probe batches."""
    summary = import_hf(hf_dir, root, parallel, seq_length=SEQ, progress=False)
    return {"logits": _logits(load_forward(summary["model"], parallel, root)), "vocab": summary["model"].vocab_size}


def import_export_reimport(cases: list) -> dict:
    """One process, per case ``(name, hf_dir, work_dir)``: import, our logits, export, re-import."""
    out = {}
    for name, hf_dir, work in cases:
        first = import_forward(hf_dir, f"{work}/ckpt", ParallelConfig())
        export_hf(f"{work}/ckpt", f"{work}/exported", max_shard_bytes=64 * 1024, progress=False)
        import_hf(f"{work}/exported", f"{work}/reimported", ParallelConfig(), seq_length=SEQ, progress=False)
        out[name] = first
    return out


def import_in_layouts(cases: list, layouts: dict) -> dict:
    """Per case and layout name: import into that layout and return our logits (rank with the logits)."""
    out = {}
    for name, hf_dir, work in cases:
        for lname, parallel in layouts.items():
            out[(name, lname)] = import_forward(hf_dir, f"{work}/{lname}", parallel)
    return out


def grow_and_forward(source_root: str, grown_root: str, growth, parallel: ParallelConfig):
    """Offline growth of ``source_root`` (the real grow_checkpoint), then our logits of the grown model."""
    from megatron_grow.checkpoint import paths
    from megatron_grow.checkpoint.manifest import read_checkpoint_info
    from megatron_grow.growth.grow import grow_checkpoint

    grow_checkpoint(source_root, grown_root, growth, parallel, progress=False)
    ckpt, it = paths.resolve_checkpoint_dir(grown_root)
    model = read_checkpoint_info(ckpt, it).model
    result = load_forward(model, parallel, grown_root)
    return None if result is None else {"logits": result["logits"], "vocab": model.vocab_size}


def grow_many_and_forward(source_root: str, cases: dict, parallel: ParallelConfig) -> dict:
    """``grow_and_forward`` for each ``{name: (grown_root, growth)}`` in one set of processes."""
    return {name: grow_and_forward(source_root, root, growth, parallel) for name, (root, growth) in cases.items()}


def safetensors_dir(hf_dir: str) -> dict:
    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def checkpoint_tensors(root: str) -> dict:
    reader = CheckpointReader(root)
    return {k: reader.read(k) for k in reader.tensors}
