"""Train a small MoE, grow it (depth x2, then width x2), train on, and compare with scratch.

    megatron-grow demo                                 # KJV corpus, CPU sizes, 2 ranks (< 5 min)
    megatron-grow demo --text notes.txt --workdir runs/mine
    megatron-grow demo --size gpu                      # larger sizes (auto picks gpu with CUDA)
    megatron-grow demo --reduced                       # the CI variant: a few steps per phase

Phases: tokenizer + dataset (skipped when present), base at a constant LR, offline growth
(grow_checkpoint + verify_growth), the grown model trained on, and the grown architecture
trained from scratch with the same additional FLOPs. Prints a table of validation loss vs
FLOPs and writes WORKDIR/results.json, WORKDIR/loss_vs_flops.png and WORKDIR/table.txt.
The recipes it trains with are in WORKDIR/recipes/ (usable with megatron-grow train).
"""

from __future__ import annotations

import argparse

from megatron_grow.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/demo", help="where data, checkpoints and results go")
    parser.add_argument("--text", nargs="+", default=None, metavar="FILE",
                        help="your own corpus (.txt[.gz] or .jsonl[.gz] with a 'text' key); default: the "
                             "shipped KJV Bible")
    parser.add_argument("--size", choices=("cpu", "gpu", "auto"), default="auto",
                        help="model and step sizes (auto: gpu when CUDA is available)")
    parser.add_argument("--reduced", action="store_true", help="a few steps per phase (CI; about a minute)")
    parser.add_argument("--ranks", type=int, default=None, metavar="N",
                        help="processes per phase (default: 2 on CPU, one per GPU with --size gpu)")


def run(args: argparse.Namespace) -> int:
    from megatron_grow.experiments.demo import run_demo

    if args.ranks is not None and args.ranks < 1:
        raise UserInputError("--ranks must be >= 1")
    run_demo(workdir=args.workdir, texts=args.text, size=args.size, reduced=args.reduced, ranks=args.ranks)
    return 0
