"""``megatron-grow plan`` on a growth recipe: the rehearsal of its offline growth, as data and as text.

The recipe's ``model:`` is the source, ``parallel:`` the grown run's layout (the target of the
grow); the source checkpoint's layout is ``parallel:`` with ``--source-parallel`` overrides, on
``--source-nodes`` nodes. The rehearsal itself is ``growth.rehearsal`` (every rank of the real
streaming grow, no data); this module picks its inputs and presents its figures.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig, Recipe
from megatron_grow.growth.rehearsal import rehearse_growth

DEFAULT_BANDWIDTH_GIB_S = 2.0  # per node: a parallel filesystem client, a conservative figure


def source_parallel(config: str, overrides: list[str], source_overrides: list[str]) -> ParallelConfig:
    """The source checkpoint's layout: the recipe's ``parallel:`` with ``key=value`` overrides (checked as
    any recipe override is)."""
    return load_recipe(config, list(overrides) + [f"parallel.{o}" for o in source_overrides]).parallel


def rehearse_recipe(recipe: Recipe, world: int, source_world: int, source_layout: ParallelConfig, *,
                    gpus_per_node: int, bandwidth_gib_s: float) -> dict[str, Any]:
    """The rehearsal's summary, the carry figures and every rank's figures, as plain data."""
    dtype = torch.bfloat16 if recipe.training.bf16 else torch.float32  # how the source run stored its weights
    result = rehearse_growth(recipe.model, recipe.growth, source_layout, source_world, recipe.parallel, world,
                             gpus_per_node=gpus_per_node, source_dtype=dtype)
    out = result.summary(bandwidth_gib_s)
    out["source_layout"] = {k: getattr(source_layout, k) for k in (
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
        "expert_tensor_parallel_size", "virtual_pipeline_model_parallel_size")}
    out["source_dtype"] = str(dtype).replace("torch.", "")
    out["optimizer_carry_adds"] = result.carry()
    out["ranks"] = [dataclasses.asdict(r) for r in result.ranks]
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


def format_rehearsal(r: dict[str, Any]) -> str:
    busiest, held, carry = r["busiest_rank"], r["peak_held_rank"], r["optimizer_carry_adds"]
    rows = [
        ("growth rehearsal", f"{r['source_world']} source ranks ({r['source_dtype']}) -> {r['target_world']} "
                             f"target ranks, every rank simulated in {r['rehearsal_seconds']:.0f} s"),
        ("coverage", f"{r['coverage']['target_tensors_tiled_exactly_once']} target tensors tiled exactly once; "
                     "every read inside a stored source chunk"),
        ("source / grown checkpoint", f"{_gib(r['source_bytes'])} / {_gib(r['target_bytes'])}"),
        ("read (all ranks)", f"{_gib(r['bytes_read'])} = {r['read_over_source']:.2f} x the source"),
        ("written (all ranks)", _gib(r["bytes_written"])),
        ("busiest rank", f"rank {busiest['rank']}: reads {_gib(busiest['bytes_from_storage'])}, "
                         f"writes {_gib(busiest['bytes_written'])}"),
        ("streaming buffers, peak", f"{_gib(held['peak_held_bytes'])} on rank {held['rank']} "
                                    f"({r['writer_threads']} writer threads, lockstep order)"),
        ("predicted I/O time", f"{r['predicted_seconds']:.0f} s at {r['bandwidth_gib_s_per_node']:g} GiB/s per "
                               f"node (node {r['busiest_node']['node']} moves {_gib(r['busiest_node']['bytes'])})"),
        ("optimizer carry adds", f"reads {_gib(carry['bytes_read'])}, writes {_gib(carry['bytes_written'])}; "
                                 f"per rank up to {_gib(carry['max_rank_memory_bytes'])} held (not streamed)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
