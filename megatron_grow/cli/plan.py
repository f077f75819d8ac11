"""Check a recipe's parallel layout and estimate parameters, memory, FLOPs and time on H100s.

    megatron-grow plan --config configs/models/17b.yaml
    megatron-grow plan --config configs/models/70b.yaml --nodes 8 --mfu 0.35 --json
    megatron-grow plan --config configs/models/tiny.yaml parallel.tensor_model_parallel_size=2
    megatron-grow plan --config configs/growth/17b_to_35b.yaml --nodes 4 --source-nodes 1 \
        --source-parallel pipeline_model_parallel_size=1
    megatron-grow plan --config configs/growth/35b_to_70b.yaml --nodes 4 --json

On a growth recipe, plan also rehearses the grow (``growth.rehearsal``, docs/scale.md): every
rank of ``megatron-grow grow`` from the source layout (``parallel:`` with ``--source-parallel``
overrides, on ``--source-nodes``) into the recipe's, simulated with no data: bytes read and
written and streaming memory per rank, coverage, the predicted I/O time at
``--bandwidth-gib-s`` per node, and what ``growth.optimizer: carry`` adds (``--no-rehearsal``
skips it; it takes ~1-3 minutes at the paper's sizes).

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
import dataclasses
import json

from megatron_grow.config.check import built_model
from megatron_grow.config.growth_rules import resolved_order
from megatron_grow.config.loader import load_recipe
from megatron_grow.errors import ConfigError
from megatron_grow.training.peak_flops import DEFAULT_GPU, PEAK_BF16_TFLOPS, lookup_peak_tflops


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
    parser.add_argument("--source-nodes", type=int, default=None,
                        help="growth recipes: nodes that saved the source checkpoint (default: --nodes)")
    parser.add_argument("--source-parallel", action="append", default=[], metavar="key=value",
                        help="growth recipes: the source checkpoint's layout, as overrides of parallel: "
                             "(repeatable; e.g. pipeline_model_parallel_size=1)")
    parser.add_argument("--bandwidth-gib-s", type=float, default=None,
                        help="growth recipes: filesystem bandwidth per node for the predicted grow time "
                             "(default 2)")
    parser.add_argument("--no-rehearsal", action="store_true",
                        help="growth recipes: skip the rehearsal of the grow (every rank simulated, no data)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")


def _argument_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.nodes is not None and args.nodes < 1:
        problems.append(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 1:
        problems.append(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    if not 0.0 < args.mfu <= 1.0:
        problems.append(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        problems.append(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.source_nodes is not None and args.source_nodes < 1:
        problems.append(f"--source-nodes must be >= 1, got {args.source_nodes}")
    if args.bandwidth_gib_s is not None and args.bandwidth_gib_s <= 0:
        problems.append(f"--bandwidth-gib-s must be > 0, got {args.bandwidth_gib_s}")
    if args.peak_tflops is None and lookup_peak_tflops(args.gpu) is None:
        problems.append(f"--gpu {args.gpu!r} is not in the peak table; give --peak-tflops")
    return problems


def run(args: argparse.Namespace) -> int:
    from megatron_grow.analysis.run_estimate import choose_world_size, estimate_run, format_estimate

    problems = _argument_problems(args)
    if problems:
        raise ConfigError(problems)
    recipe = load_recipe(args.config, args.overrides)  # a growth recipe's layout is checked on the grown model
    source_recipe = recipe
    if recipe.growth is not None:
        # A growth recipe's model: is the source; its parallel:/training: sections are the grown run's.
        recipe = dataclasses.replace(recipe, model=built_model(recipe))
        if not args.json:
            grown = recipe.model
            print(f"planning the grown model ({' then '.join(resolved_order(recipe.growth))} growth of "
                  f"the recipe's model: section): {grown.num_layers} layers, {grown.num_moe_experts} experts, "
                  f"top-{grown.moe_router_topk}")
    if args.nodes is not None:
        world, choice = args.nodes * args.gpus_per_node, ""
    else:
        world, choice = choose_world_size(recipe, args.gpus_per_node)
    peak_tflops = args.peak_tflops if args.peak_tflops is not None else lookup_peak_tflops(args.gpu)[1]
    estimate = estimate_run(recipe, world, gpus_per_node=args.gpus_per_node, mfu=args.mfu,
                            peak_flops=peak_tflops * 1e12, world_choice=choice, source=args.config)
    rehearsal = None
    if recipe.growth is not None and not args.no_rehearsal:
        rehearsal = _rehearsal(args, source_recipe, world)
        estimate["rehearsal"] = rehearsal
    print(json.dumps(estimate, sort_keys=True) if args.json else format_estimate(estimate))
    if rehearsal is not None and not args.json:
        from megatron_grow.analysis.growth_rehearsal import format_rehearsal

        print(format_rehearsal(rehearsal))
    return 0


def _rehearsal(args: argparse.Namespace, recipe, world: int) -> dict:
    """The grow from the source layout into the recipe's, every rank simulated (``growth.rehearsal``)."""
    from megatron_grow.analysis.growth_rehearsal import DEFAULT_BANDWIDTH_GIB_S, rehearse_recipe, source_parallel

    layout = source_parallel(args.config, args.overrides, args.source_parallel)
    source_world = (args.source_nodes * args.gpus_per_node) if args.source_nodes is not None else world
    return rehearse_recipe(recipe, world, source_world, layout, gpus_per_node=args.gpus_per_node,
                           bandwidth_gib_s=args.bandwidth_gib_s or DEFAULT_BANDWIDTH_GIB_S)
