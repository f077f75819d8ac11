"""Describe a checkpoint: architecture, saved layout, counters, growth lineage, tensors and bytes.

    megatron-grow inspect runs/grown                  # the tracker's iteration
    megatron-grow inspect runs/grown/iter_0000100 --stats
    megatron-grow inspect runs/grown --json

CKPT is a run root (latest_checkpointed_iteration.txt picks the iteration) or an iter_N
directory. Metadata only by default; --stats also reads every tensor (region by region, at
most --max-mib at a time; no model is built, no torch.distributed) for mean / std / absmax
and counts NaN / ±inf elements: a tensor holding any is marked NON-FINITE in the table (its stats
are those of the finite rest) and, after the report, one error line names them; exit code 2
(the checkpoint is bad input for grow, export-hf and train, which refuse it too).
"""

from __future__ import annotations

import argparse
import json

from megatron_grow.errors import CheckpointError, UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="run root or iter_N directory")
    parser.add_argument("--stats", action="store_true", help="read tensors for mean / std / absmax")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--max-mib", type=float, default=256.0, help="largest single read in MiB (default 256)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    from megatron_grow.analysis.inspection import format_inspect, inspect_checkpoint, non_finite_tensors
    from megatron_grow.checkpoint.reader import stderr_progress

    if args.max_mib <= 0:
        raise UserInputError(f"--max-mib must be > 0, got {args.max_mib}")
    progress = None if args.quiet or not args.stats else stderr_progress("inspect", 2.0)
    report = inspect_checkpoint(args.checkpoint, stats=args.stats, max_bytes=int(args.max_mib * 2**20),
                                progress=progress)
    print(json.dumps(report, sort_keys=True, default=str) if args.json else format_inspect(report), flush=True)
    bad = non_finite_tensors(report) if args.stats else []
    if bad:  # the report is printed; the checkpoint is bad input for grow, export-hf and train alike
        raise CheckpointError(f"{len(bad)} tensor(s) of {report['checkpoint']} hold non-finite values: "
                              f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    return 0
