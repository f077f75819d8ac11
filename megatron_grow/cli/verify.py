"""Compare a grown checkpoint with its source on a probe batch.

    megatron-grow verify --load SRC --grown DST [--expert-model-parallel-size 2 ...]

Prints logits KL(source || grown), top-1 agreement, max |logit difference| and the routing
load of original vs copied experts. Run under torchrun for a parallel layout. SRC's
architecture is resolved as grow resolves it (--source-config, megatron_grow.json, Megatron-LM
args). Exit code 4 when --max-kl or --min-routing-share is given and not met.
"""

from __future__ import annotations

import argparse
import json
import os

from megatron_grow.cli._common import (
    add_layout_arguments,
    add_verify_threshold_arguments,
    check_verify_thresholds,
    layout_from_args,
)
from megatron_grow.config.schema import ParallelConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="source checkpoint root")
    parser.add_argument("--grown", required=True, help="grown checkpoint root (written by megatron-grow grow)")
    parser.add_argument("--source-config", default=None,
                        help="recipe whose model: section describes SRC (wins over what SRC records)")
    parser.add_argument("--seq-length", type=int, default=None, help="probe sequence length (default min(64, model))")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    add_verify_threshold_arguments(parser)
    add_layout_arguments(parser)


def run(args: argparse.Namespace) -> int:
    check_verify_thresholds(args)  # before the slow imports and the probe run
    from megatron_grow.growth.verify import check_thresholds, format_metrics, verify_growth
    from megatron_grow.parallel.init import destroy_distributed

    try:
        metrics = verify_growth(args.load, args.grown, layout_from_args(args, ParallelConfig()),
                                seq_length=args.seq_length, source_model=args.source_config)
    finally:
        destroy_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(metrics) if args.json else format_metrics(metrics), flush=True)
    check_thresholds(metrics, args.max_kl, args.min_routing_share)
    return 0
