"""Per-layer expert routing shares of a checkpoint on calibration tokens (for growth.upcycle: utility).

    megatron-grow route-stats --load CKPT --data PREFIX [--tokens N] --out FILE.json
    megatron-grow launch --nproc-per-node 2 route-stats --load CKPT --data PREFIX --out FILE.json \\
        --expert-model-parallel-size 2

Runs the real model with its real routers on the first N tokens of the indexed dataset PREFIX
(any parallel layout; each token routed once, counts summed over every rank) and writes per
layer the tokens routed to each expert and their shares. growth.upcycle.utility_stats: FILE.json
then copies experts in proportion to their mean share (docs/growth.md, "Expert upcycling").
"""

from __future__ import annotations

import argparse
import os

from megatron_grow.cli._common import add_layout_arguments, layout_from_args
from megatron_grow.config.schema import ParallelConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="checkpoint root (or an iter_N directory)")
    parser.add_argument("--data", required=True, help="indexed-dataset prefix (.bin/.idx), tokenized as the model")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens (default 65536)")
    parser.add_argument("--seq-length", type=int, default=None, help="sequence length (default: the model's)")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="sequences per forward micro batch")
    parser.add_argument("--source-config", default=None,
                        help="recipe whose model: section describes CKPT (when it records none)")
    add_layout_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from megatron_grow.errors import UserInputError
    from megatron_grow.growth.route_stats import route_stats, write_stats
    from megatron_grow.parallel.init import destroy_distributed

    for flag, value in (("--tokens", args.tokens), ("--micro-batch-size", args.micro_batch_size),
                        ("--seq-length", args.seq_length or 1)):
        if value < 1:
            raise UserInputError(f"{flag}: {value} is not allowed; must be >= 1")
    try:
        stats = route_stats(args.load, args.data, layout_from_args(args, ParallelConfig()), tokens=args.tokens,
                            seq_length=args.seq_length, micro_batch=args.micro_batch_size,
                            source_model=args.source_config)
        write_stats(args.out, stats)
    finally:
        destroy_distributed()
    if os.environ.get("RANK", "0") == "0":
        mean = [sum(row[e] for row in stats["shares"]) / stats["num_layers"] for e in range(stats["num_experts"])]
        print(f"route-stats: {stats['tokens']} tokens, {stats['num_layers']} layers x {stats['num_experts']} "
              f"experts -> {args.out}")
        print("  mean share per expert: " + " ".join(f"{x:.3f}" for x in mean), flush=True)
    return 0
