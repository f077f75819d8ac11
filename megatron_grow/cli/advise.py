"""Pick the checkpoint of a run to grow from: sunk FLOPs, sunk/F_c and LR phase per checkpoint.

    megatron-grow advise runs/base
    megatron-grow advise runs/base --json

Reads every complete iter_NNNNNNN in RUN_DIR (manifests and counters only, no tensors) and
prints iteration, tokens, sunk FLOPs, sunk / F_c and the LR phase (warmup / stable / decay /
constant, from the recipe saved in the manifest and the iteration). Recommends the latest
constant-LR (pre-decay) checkpoint with sunk >= 1x F_c, depth interposition, and a
continued-training budget of at least ~1x its sunk FLOPs (arXiv 2510.08008, docs/paper.md §6-8).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's checkpoint root (holds iter_* directories)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from megatron_grow.analysis.advice import advise_run, format_advice

    report = advise_run(args.run_dir)
    print(json.dumps(report, sort_keys=True) if args.json else format_advice(report))
    return 0
