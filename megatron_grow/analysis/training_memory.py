"""The training side at full size: parameters per GPU from the real model on ``meta``, against ``plan``'s formula.

``megatron-grow plan`` estimates memory per GPU with a formula (``models.params.memory_per_gpu``:
parameters per layer per GPU, the embedding on the first stage, the head and final norm on the
last). This module checks the parameter part of that formula against Megatron-Core itself: for
each pipeline stage it builds the recipe's model on the meta device as one rank of that stage
(``parallel.simulated``: the real parallel state at the real world size, fake collectives) and
counts its parameters, dense and routed-expert (MCore marks expert parameters ``allreduce=False``).
Bytes per parameter are the formula's (bf16 weights, fp32 main grads, distributed Adam); the
activations are the formula's (nothing is run).

    python -m megatron_grow.analysis.training_memory configs/models/35b.yaml 32
    python -m megatron_grow.analysis.training_memory configs/growth/35b_to_70b.yaml 32   # the grown 70B
"""

from __future__ import annotations

import dataclasses
import json
import sys

from megatron_grow.config.check import built_model
from megatron_grow.config.layout_rules import resolve_layout
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import Recipe
from megatron_grow.models.builder import build_model_chunks
from megatron_grow.models.params import _params_per_layer_on_gpu, _pipeline_stages, memory_per_gpu
from megatron_grow.parallel.simulated import simulated_rank
from megatron_grow.platform import cpu

GIB = 2**30
# What nvidia-smi reports as the memory of one GPU (MiB): H100 SXM 80 GB, H200 141 GB.
GPU_MEMORY_GIB = {"H100 80GB": 81559 / 1024, "H200 141GB": 143771 / 1024}


def stage_parameters(recipe: Recipe, world: int) -> list[dict]:
    """Per pipeline stage: (dense, expert) parameters on one GPU, from the model built on meta as the
    stage's first rank (MCore orders ranks tp-cp-ep-dp-pp: pp outermost), and from the formula."""
    model, parallel = recipe.model, recipe.parallel
    layout = resolve_layout(parallel, world)
    dense_layer, expert_layer = _params_per_layer_on_gpu(model, layout)
    extra = {name: dense for name, dense, _, _ in _pipeline_stages(model, parallel, recipe.training, layout, 0.0)}
    layers = model.num_layers // layout.pp
    out = []
    for stage in range(layout.pp):
        name = "only" if layout.pp == 1 else "first" if stage == 0 else "last" if stage == layout.pp - 1 else "middle"
        with simulated_rank(parallel, stage * (world // layout.pp), world):
            dense = expert = 0
            for chunk in build_model_chunks(model, parallel, meta=True):
                for p in chunk.parameters():
                    if getattr(p, "allreduce", True):
                        dense += p.numel()
                    else:
                        expert += p.numel()
        out.append({"stage": stage, "name": name, "dense_params": dense, "expert_params": expert,
                    "formula_dense_params": layers * dense_layer + extra.get(name, 0.0),
                    "formula_expert_params": layers * expert_layer})
    return out


def first_step_memory(recipe: Recipe, world: int) -> dict:
    """Weights, grads and Adam bytes per GPU of the most loaded stage from the real parameter counts, plus
    the formula's activations; and whether that fits each GPU of ``GPU_MEMORY_GIB``."""
    layout = resolve_layout(recipe.parallel, world)
    formula = memory_per_gpu(recipe.model, recipe.parallel, recipe.training, layout)
    wbytes, opt_bytes = (2, 12) if recipe.training.bf16 else (4, 8)
    dense_shard = layout.dp * layout.cp if recipe.parallel.use_distributed_optimizer else 1
    expert_shard = layout.expert_dp if recipe.parallel.use_distributed_optimizer else 1
    stages = stage_parameters(recipe, world)
    for s in stages:
        params = s["dense_params"] + s["expert_params"]
        s["state_bytes"] = (wbytes + 4) * params + opt_bytes * (s["dense_params"] / dense_shard
                                                                + s["expert_params"] / expert_shard)
    worst = max(stages, key=lambda s: s["state_bytes"])
    total = worst["state_bytes"] + formula.activations + formula.logits
    return {"world_size": world, "stages": stages, "most_loaded_stage": worst["stage"],
            "state_gib": worst["state_bytes"] / GIB, "formula_state_gib": (formula.weights + formula.grads
                                                                            + formula.optimizer) / GIB,
            "activations_gib": (formula.activations + formula.logits) / GIB, "first_step_gib": total / GIB,
            "fits": {gpu: total / GIB <= gib for gpu, gib in GPU_MEMORY_GIB.items()}}


def _main(argv: list | None = None) -> int:
    cpu.apply_cpu_adaptations()  # an entry point
    path, world = (argv if argv is not None else sys.argv[1:])[:2]
    recipe = load_recipe(path)
    if recipe.growth is not None:  # a growth recipe trains the grown model
        recipe = dataclasses.replace(recipe, model=built_model(recipe), growth=None)
    print(json.dumps(first_step_memory(recipe, int(world)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
