"""Check a recipe's parallel layout and estimate parameters, memory, FLOPs and time on H100s.

    megatron-grow plan --config configs/models/17b.yaml
    megatron-grow plan --config configs/models/70b.yaml --nodes 8 --mfu 0.35 --json
    megatron-grow plan --config configs/models/tiny.yaml parallel.tensor_model_parallel_size=2

Impossible layouts (TP not dividing the heads, EP not dividing the experts, PP not dividing
the layers, a world size that TP x PP x CP does not divide, a global batch that micro batch x
DP does not divide, ...) are refused with the reason and exit code 2.

World size: ``--nodes N`` gives N x ``--gpus-per-node`` (default 8). Without ``--nodes`` the
plan uses the smallest whole number of nodes whose GPU count both TP x PP x CP and
ETP x EP x PP divide, i.e. the minimum data parallelism the expert layout allows, rounded up
to full nodes (falling back to the bare minimum if that breaks batch divisibility); the
output says which. Parameters come from ``megatron_grow.models.params`` (activated counted as
the paper does: input embedding and output layer included), FLOPs from
``megatron_grow.training.flops`` (full attention, as Megatron-LM counts), memory from
``megatron_grow.models.params.memory_per_gpu`` (formula in its docstring). Time per step =
FLOPs per step / (world x peak x MFU), peak = the dense bf16 figure of ``--gpu`` (default H100 SXM,
989.5 TFLOP/s; table in ``megatron_grow/training/peak_flops.py``) or ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from megatron_grow.config.loader import ConfigError, load_recipe
from megatron_grow.config.schema import Recipe
from megatron_grow.models.mcore_config import padded_vocab_size
from megatron_grow.models.params import count_params, memory_per_gpu
from megatron_grow.parallel.init import LayoutError
from megatron_grow.parallel.topology import resolve_layout, sequence_parallel_enabled, world_layout_problems
from megatron_grow.training.flops import chinchilla_flops, training_flops_per_token
from megatron_grow.training.peak_flops import PEAK_BF16_TFLOPS, lookup_peak_tflops

DEFAULT_GPU = "H100 SXM"
# nvidia-smi reports 81,559 MiB on an H100 80GB.
H100_MEMORY_GIB = 81559 / 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="RECIPE.yaml", help="recipe to plan")
    parser.add_argument("--nodes", type=int, default=None, help="number of nodes (default: the minimum, see above)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    parser.add_argument("--gpu", default=DEFAULT_GPU,
                        help=f"GPU whose dense bf16 peak sets the step time (default {DEFAULT_GPU}; one of "
                             f"{', '.join(label for _, label, _ in PEAK_BF16_TFLOPS)})")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak dense bf16 TFLOP/s per GPU; overrides --gpu (e.g. a measured matmul ceiling)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")


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


def make_plan(recipe: Recipe, world_size: int, *, gpus_per_node: int = 8, mfu: float = 0.4,
              peak_flops: float | None = None, world_choice: str = "",
              source: str = "") -> dict[str, Any]:
    """Everything ``plan`` prints, as plain data. Raises LayoutError for an impossible layout."""
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


def format_table(plan: dict[str, Any]) -> str:
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


def run(args: argparse.Namespace) -> int:
    problems = []
    if args.nodes is not None and args.nodes < 1:
        problems.append(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 1:
        problems.append(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    if not 0.0 < args.mfu <= 1.0:
        problems.append(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        problems.append(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    gpu_peak = lookup_peak_tflops(args.gpu)
    if args.peak_tflops is None and gpu_peak is None:
        problems.append(f"--gpu {args.gpu!r} is not in the peak table; give --peak-tflops")
    if problems:
        raise ConfigError(problems)
    recipe = load_recipe(args.config, args.overrides)
    if recipe.growth is not None:
        # A growth recipe's model: is the source; its parallel:/training: sections are the grown run's.
        import dataclasses

        from megatron_grow.growth.plan import make_growth_plan
        from megatron_grow.parallel.topology import model_layout_problems

        grown = make_growth_plan(recipe.model, recipe.growth).target
        layout_problems = model_layout_problems(grown, recipe.parallel)
        if layout_problems:
            raise LayoutError("; ".join(layout_problems))
        recipe = dataclasses.replace(recipe, model=grown)
        if not args.json:
            print(f"planning the grown model ({' then '.join(recipe.growth.order or ('depth', 'width'))} growth of "
                  f"the recipe's model: section): {grown.num_layers} layers, {grown.num_moe_experts} experts, "
                  f"top-{grown.moe_router_topk}")
    if args.nodes is not None:
        world, choice = args.nodes * args.gpus_per_node, ""
    else:
        world, choice = choose_world_size(recipe, args.gpus_per_node)
    plan = make_plan(recipe, world, gpus_per_node=args.gpus_per_node, mfu=args.mfu,
                     peak_flops=(args.peak_tflops if args.peak_tflops is not None else gpu_peak[1]) * 1e12,
                     world_choice=choice, source=args.config)
    print(json.dumps(plan, sort_keys=True) if args.json else format_table(plan))
    return 0
