"""Compare a grown checkpoint with its source on a probe batch.

    megatron-grow verify --load SRC --grown DST [--expert-model-parallel-size 2 ...]

Prints logits KL(source || grown), top-1 agreement, max |logit difference| and the routing
load of original vs copied experts. Run under torchrun for a parallel layout.
"""

from __future__ import annotations

import argparse
import json

from megatron_grow.cli._common import add_layout_arguments, layout_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="source checkpoint root")
    parser.add_argument("--grown", required=True, help="grown checkpoint root (written by megatron-grow grow)")
    parser.add_argument("--seq-length", type=int, default=None, help="probe sequence length (default min(64, model))")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    add_layout_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_grow.config.schema import ParallelConfig
    from megatron_grow.growth.verify import format_metrics, verify_growth
    from megatron_grow.parallel.init import destroy_distributed

    try:
        metrics = verify_growth(args.load, args.grown, layout_from_args(args, ParallelConfig()),
                                seq_length=args.seq_length)
    finally:
        destroy_distributed()
    if not torch.distributed.is_initialized() and (__import__("os").environ.get("RANK", "0") == "0"):
        print(json.dumps(metrics) if args.json else format_metrics(metrics))
    return 0
