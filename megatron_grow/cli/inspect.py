"""Describe a checkpoint: architecture, saved layout, counters, growth lineage, tensors and bytes.

    megatron-grow inspect runs/grown                  # the tracker's iteration
    megatron-grow inspect runs/grown/iter_0000100 --stats
    megatron-grow inspect runs/grown --json

CKPT is a run root (latest_checkpointed_iteration.txt picks the iteration) or an iter_N
directory. Metadata only by default; --stats also reads every tensor (region by region, at
most --max-mib at a time; no model is built, no torch.distributed) for mean / std / absmax.
"""

from __future__ import annotations

import argparse
import json

from megatron_grow.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="run root or iter_N directory")
    parser.add_argument("--stats", action="store_true", help="read tensors for mean / std / absmax")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--max-mib", type=float, default=256.0, help="largest single read in MiB (default 256)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    from megatron_grow.analysis.inspection import format_inspect, inspect_checkpoint
    from megatron_grow.checkpoint.reader import stderr_progress

    if args.max_mib <= 0:
        raise UserInputError(f"--max-mib must be > 0, got {args.max_mib}")
    progress = None if args.quiet or not args.stats else stderr_progress("inspect", 2.0)
    report = inspect_checkpoint(args.checkpoint, stats=args.stats, max_bytes=int(args.max_mib * 2**20),
                                progress=progress)
    print(json.dumps(report, sort_keys=True, default=str) if args.json else format_inspect(report))
    return 0
