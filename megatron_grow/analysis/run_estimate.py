"""Resource estimate of a training run: does a layout fit, and what it costs per step.

For a recipe and a world size: the layout checks (``config.layout_rules``), parameters
(``models.params``; activated counted as the paper does: input embedding and output layer
included), FLOPs (``training.flops``; full attention, as Megatron-LM counts), memory per GPU
(``models.params.memory_per_gpu``, formula in its docstring) and time per step = FLOPs per
step / (world x peak x MFU). ``megatron-grow plan`` prints it.
"""

from __future__ import annotations

import math
from typing import Any

from megatron_grow.config.layout_rules import (
    padded_vocab_size,
    resolve_layout,
    sequence_parallel_enabled,
    world_layout_problems,
)
from megatron_grow.config.schema import Recipe
from megatron_grow.errors import LayoutError
from megatron_grow.models.params import count_params, memory_per_gpu
from megatron_grow.training.flops import chinchilla_flops, training_flops_per_token
from megatron_grow.training.peak_flops import DEFAULT_GPU, lookup_peak_tflops

# nvidia-smi reports 81,559 MiB on an H100 80GB.
H100_MEMORY_GIB = 81559 / 1024


def choose_world_size(recipe: Recipe, gpus_per_node: int) -> tuple[int, str]:
    """The world size used without ``--nodes`` and a sentence saying why."""
    layout = resolve_layout(recipe.parallel, 1)
    dense = layout.tp * layout.pp * layout.cp
    expert = layout.etp * layout.ep * layout.pp
    minimum = math.lcm(dense, expert)
    whole_nodes = math.lcm(minimum, gpus_per_node)
    if not world_layout_problems(recipe.parallel, whole_nodes, recipe.training):
        return whole_nodes, (f"{whole_nodes // gpus_per_node} node(s) x {gpus_per_node} GPUs: the fewest whole "
                             f"nodes that tp x pp x cp ({dense}) and etp x ep x pp ({expert}) divide")
    return minimum, (f"{minimum} GPU(s): the minimum that tp x pp x cp ({dense}) and etp x ep x pp ({expert}) "
                     f"divide (whole nodes of {gpus_per_node} break batch divisibility)")


def estimate_run(recipe: Recipe, world_size: int, *, gpus_per_node: int = 8, mfu: float = 0.4,
              peak_flops: float | None = None, world_choice: str = "",
              source: str = "") -> dict[str, Any]:
    """Everything ``megatron-grow plan`` prints, as plain data. Raises LayoutError for an impossible layout."""
    model, parallel, training = recipe.model, recipe.parallel, recipe.training
    problems = world_layout_problems(parallel, world_size, training)
    if problems:
        raise LayoutError("; ".join(problems))
    layout = resolve_layout(parallel, world_size)
    tp = parallel.tensor_model_parallel_size
    params = count_params(model, tp)
    flops = training_flops_per_token(model, tp=tp)
    tokens_per_step = training.global_batch_size * model.seq_length
    flops_per_step = flops.total * tokens_per_step
    if peak_flops is None:
        peak_flops = lookup_peak_tflops(DEFAULT_GPU)[1] * 1e12
    step_time = flops_per_step / (world_size * peak_flops * mfu)
    mem = memory_per_gpu(model, parallel, training, layout)
    mem_gib = mem.total / 1024 ** 3
    return {
        "recipe": source,
        "total_params": params.total,
        "active_params": params.activated,
        "active_params_without_embedding": params.activated_without_embedding,
        "expert_params": params.expert,
        "non_expert_params": params.non_expert,
        "embedding_params": params.embedding,
        "padded_vocab_size": padded_vocab_size(model, tp),
        "memory_per_gpu_gib": mem_gib,
        "memory_breakdown_gib": mem.breakdown_gib(),
        "memory_stage": mem.stage,
        "memory_fits_h100": mem_gib <= H100_MEMORY_GIB,
        "flops_per_token": flops.total,
        "flops_per_token_breakdown": flops.as_dict(),
        "flops_per_step": flops_per_step,
        "tokens_per_step": tokens_per_step,
        "chinchilla_flops": chinchilla_flops(params.activated),
        "mfu": mfu,
        "peak_flops_per_gpu": peak_flops,
        "step_time_s": step_time,
        "time_per_1b_tokens_s": step_time * 1e9 / tokens_per_step,
        "layout": {
            "world_size": world_size,
            "nodes": world_size / gpus_per_node,
            "gpus_per_node": gpus_per_node,
            "world_choice": world_choice,
            "tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "cp": layout.cp,
            "ep": layout.ep, "etp": layout.etp, "dp": layout.dp, "expert_dp": layout.expert_dp,
            "sequence_parallel": sequence_parallel_enabled(parallel),
            "micro_batch_size": training.micro_batch_size,
            "global_batch_size": training.global_batch_size,
            "num_micro_batches": training.global_batch_size // (training.micro_batch_size * layout.dp),
            "recompute_granularity": training.recompute_granularity,
        },
    }


def _fmt_params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3f}B ({n:,})"
    return f"{n / 1e6:.3f}M ({n:,})" if n >= 1e6 else f"{n:,}"


def _fmt_time(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds:.1f} s ({seconds / 3600:.2f} h)"
    return f"{seconds:.2f} s"


def format_estimate(plan: dict[str, Any]) -> str:
    lay, mem = plan["layout"], plan["memory_breakdown_gib"]
    nodes = lay["nodes"]
    nodes_text = f"{nodes:g}" if nodes >= 1 else f"{nodes:g} (part of one node)"
    rows = [
        ("recipe", plan["recipe"]),
        ("world", f"{lay['world_size']} GPUs = {nodes_text} node(s) x {lay['gpus_per_node']}"),
        ("world chosen as", lay["world_choice"] or "--nodes x --gpus-per-node"),
        ("layout", f"tp {lay['tp']}  pp {lay['pp']}  vpp {lay['vpp']}  cp {lay['cp']}  ep {lay['ep']}  "
                   f"etp {lay['etp']}  dp {lay['dp']}  expert dp {lay['expert_dp']}  "
                   f"sp {'on' if lay['sequence_parallel'] else 'off'}"),
        ("batch", f"global {lay['global_batch_size']} x micro {lay['micro_batch_size']} -> "
                  f"{lay['num_micro_batches']} micro batches per rank; {plan['tokens_per_step']:,} tokens/step"),
        ("total params", _fmt_params(plan["total_params"])),
        ("activated params (paper's count: incl. input embedding + head)", _fmt_params(plan["active_params"])),
        ("activated params without input embedding (head counted)",
         _fmt_params(plan["active_params_without_embedding"])),
        ("expert / non-expert params", f"{plan['expert_params'] / 1e9:.3f}B / {plan['non_expert_params'] / 1e9:.3f}B"),
        ("padded vocabulary", f"{plan['padded_vocab_size']:,}"),
        (f"memory per GPU ({plan['memory_stage']} stage, estimate)",
         f"{plan['memory_per_gpu_gib']:.1f} GiB" + ("" if plan["memory_fits_h100"] else
                                                     f"  ** exceeds H100 {H100_MEMORY_GIB:.1f} GiB **")),
        ("  weights / grads / optimizer", f"{mem['weights']:.1f} / {mem['grads']:.1f} / {mem['optimizer']:.1f} GiB"),
        ("  activations / logits", f"{mem['activations']:.1f} / {mem['logits']:.1f} GiB "
                                   f"(recompute: {lay['recompute_granularity'] or 'none'})"),
        ("FLOPs per token (fwd+bwd, full attention)", f"{plan['flops_per_token']:.4g}"),
        ("FLOPs per step", f"{plan['flops_per_step']:.4g}"),
        ("Chinchilla F_c = 120 N_a^2", f"{plan['chinchilla_flops']:.3g}"),
        ("time per step", f"{_fmt_time(plan['step_time_s'])} at MFU {plan['mfu']:g}, "
                          f"{plan['peak_flops_per_gpu'] / 1e12:g} TFLOP/s peak"),
        ("time per 1B tokens", _fmt_time(plan["time_per_1b_tokens_s"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
