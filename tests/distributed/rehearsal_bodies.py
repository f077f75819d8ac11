"""Process bodies for tests/distributed/test_rehearsal.py: a source saved under a layout, the real
grow with its per-rank I/O counts, and the rehearsal of the same growth (in a process of its own:
the rehearsal's fake process group needs a process without torch.distributed)."""

from __future__ import annotations

import dataclasses
import os

import torch

from megatron_grow.config.schema import GrowthConfig, ModelConfig, ParallelConfig


def save_source(root: str, model: ModelConfig, parallel: ParallelConfig) -> None:
    """``model`` saved under ``parallel`` (collective), every value a formula of its index (no RNG)."""
    from megatron_grow.checkpoint import io
    from megatron_grow.models.builder import build_model_chunks
    from megatron_grow.parallel.init import initialize_distributed
    from tests.distributed.bodies import test_manifest

    initialize_distributed(parallel)
    chunks = build_model_chunks(model, parallel, initialize=False)
    with torch.no_grad():
        for chunk in chunks:
            for i, t in enumerate(list(chunk.parameters()) + [b for n, b in chunk.named_buffers()
                                                               if n.endswith("expert_bias")]):
                index = torch.arange(t.numel(), dtype=torch.float64)
                t.copy_((torch.sin(index * 0.37 + i) * 0.02 + 0.001 * i).reshape(t.shape).to(t.dtype))
    io.save_checkpoint(root, 1, io.model_sharded_state_dict(chunks), test_manifest(model))


def grow_counted(source_root: str, grown_root: str, growth: GrowthConfig, parallel: ParallelConfig,
                 threads: int) -> dict:
    """The real offline grow with ``threads`` writer threads; this rank's I/O counts and the payload
    of the ``.distcp`` files it wrote."""
    from megatron_grow.checkpoint import paths, streaming
    from megatron_grow.growth.grow import grow_checkpoint

    streaming.DEFAULT_WRITER_THREADS = threads
    summary = grow_checkpoint(source_root, grown_root, growth, parallel, progress=False)
    ckpt, _ = paths.resolve_checkpoint_dir(grown_root)
    mine = f"__{torch.distributed.get_rank()}_"
    files = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt)
                if f.startswith(mine) and f.endswith(".distcp"))
    return {**summary["rank_io"], "file_bytes": files}


def rehearse(model: ModelConfig, growth: GrowthConfig, source_parallel: ParallelConfig, source_world: int,
             parallel: ParallelConfig, world: int, threads: int) -> list[dict]:
    from megatron_grow.growth.rehearsal import rehearse_growth

    result = rehearse_growth(model, growth, source_parallel, source_world, parallel, world, threads=threads)
    return [dataclasses.asdict(r) for r in result.ranks]


def rehearse_with_a_lost_chunk(model: ModelConfig, growth: GrowthConfig, source_parallel: ParallelConfig,
                               source_world: int, parallel: ParallelConfig, world: int) -> str | None:
    """The rehearsal over a source whose metadata lost one stored expert chunk: the error it raises
    (the source's tiling check finds it before any read would)."""
    from megatron_grow.checkpoint import keys
    from megatron_grow.errors import CheckpointError, GrowthError
    from megatron_grow.growth import rehearsal
    from megatron_grow.growth.plan import make_growth_plan

    plan = make_growth_plan(model, growth)
    with rehearsal.linear_overlap_checks():
        metadata, _ = rehearsal.simulated_metadata(model, source_parallel, source_world)
        metadata.state_dict_metadata["decoder.layers.mlp.experts.experts.linear_fc1.weight"].chunks.pop()
        try:
            rehearsal._rehearse(plan, metadata, source_world, parallel, world, 8, 1, keys.LOCAL_SPEC)
        except (CheckpointError, GrowthError) as e:
            return str(e)
    return None


def rehearsed_target_bytes(model: ModelConfig, growth: GrowthConfig, parallel: ParallelConfig, world: int,
                           source_dtypes: list) -> list:
    """The grown checkpoint's tensor bytes the rehearsal predicts, per source dtype (1-rank source)."""
    from megatron_grow.growth.rehearsal import rehearse_growth

    return [rehearse_growth(model, growth, ParallelConfig(), 1, parallel, world, source_dtype=d).target_bytes
            for d in source_dtypes]
