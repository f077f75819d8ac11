"""Synthetic "converged-looking" checkpoints for demos and docs of the analysis tools.

A CPU cannot train a model far enough for the paper's layer-wise weight-norm profile (rising
with depth, docs/paper.md §1.3) to appear, so this writes a freshly initialised model whose
routed-expert and attention matrices of layer ``l`` are multiplied by ``1 + slope * l`` (norms
and routers untouched), and saves it as one or more checkpoints of a run with the counters a
trainer would record: ``consumed_samples = iteration x global_batch_size``, ``consumed_tokens =
samples x seq_length``, ``flops_so_far = tokens x training_flops_per_token(model)``. The recipe
is saved in the manifest, so ``advise`` sees its LR schedule. Nothing here is trained: the
weights are only a stand-in with a known profile.

Runs in one process: a 1-rank gloo group is started if none exists (``parallel.init``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_grow.checkpoint import io, keys
from megatron_grow.checkpoint.manifest import build_manifest
from megatron_grow.config.loader import recipe_to_dict
from megatron_grow.config.schema import ParallelConfig, Recipe
from megatron_grow.models.builder import build_gpt_model
from megatron_grow.parallel.init import destroy_distributed, initialize_distributed
from megatron_grow.training.flops import training_flops_per_token


@torch.no_grad()
def scale_layers(model: torch.nn.Module, slope: float) -> int:
    """Multiply expert fc1/fc2 and attention qkv/proj weights of layer l by ``1 + slope * l``."""
    scaled = 0
    for name, p in model.named_parameters():
        m = keys.MODULE_LAYER_RE.match(name)
        if not m:
            continue
        expert = keys.is_routed_expert_key(name) and name.endswith((keys.FC1_NAME, keys.FC2_NAME))
        attention = name.endswith((keys.QKV_SUFFIX, keys.PROJ_SUFFIX))
        if expert or attention:
            p.mul_(1.0 + slope * int(m.group(1)))
            scaled += 1
    return scaled


def save_synthetic_run(recipe: Recipe, save: str, iterations: Sequence[int], slope: float = 1.0,
                       seed: int = 1234) -> list[str]:
    """Save the scaled model at each iteration in ``iterations`` under ``save``; returns the directories."""

    parallel = ParallelConfig()
    model_cfg, training = recipe.model, recipe.training
    initialize_distributed(parallel, seed=seed)
    try:
        gpt = build_gpt_model(model_cfg, parallel)
        scale_layers(gpt, slope)
        fpt = training_flops_per_token(model_cfg).total
        out = []
        for it in sorted(iterations):
            samples = it * training.global_batch_size
            tokens = samples * model_cfg.seq_length
            counters = {"iteration": it, "consumed_samples": samples, "consumed_tokens": tokens,
                        "flops_so_far": tokens * fpt, "sunk_flops": 0}
            manifest = build_manifest(model=model_cfg, recipe=recipe_to_dict(recipe), counters=counters, lineage=[],
                                      layout={"tp": 1, "pp": 1, "ep": 1, "etp": 1, "dp": 1, "world_size": 1})
            out.append(io.save_checkpoint(save, it, io.model_sharded_state_dict([gpt]), manifest))
            print(f"[synthetic] saved {out[-1]}: {tokens:,} tokens, {tokens * fpt:.4g} FLOPs", flush=True)
        return out
    finally:
        destroy_distributed()
