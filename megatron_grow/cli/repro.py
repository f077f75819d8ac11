"""Reproduce the paper's four findings at small scale (grown vs scratch, interposition vs stack, alpha, sunk cost).

    megatron-grow repro --tiny                          # CI scale, about two minutes on 2 CPU cores
    megatron-grow repro --size gpu                      # one GPU
    megatron-grow repro [--workdir runs/repro] [--tiny] [--size gpu|cpu|auto] [--seed N] [--ranks N]

Trains one base (saved at three iterations), grows it in the ways the findings compare, trains
every run on for the same additional FLOPs on the same validation tokens, and writes
WORKDIR/results.md (the tables), WORKDIR/results.json and four plots. docs/results.md reads the
numbers.
"""

from __future__ import annotations

import argparse

from megatron_grow.experiments.repro import run_repro


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/repro", help="where data, checkpoints and results go")
    parser.add_argument("--tiny", action="store_true", help="CI scale (every finding, a few steps each)")
    parser.add_argument("--size", choices=("cpu", "gpu", "auto"), default="auto",
                        help="model and step sizes (auto: gpu when CUDA is available); ignored with --tiny")
    parser.add_argument("--ranks", type=int, default=None, metavar="N",
                        help="processes (default: 2 on CPU, one per GPU)")
    parser.add_argument("--seed", type=int, default=1234, help="training and growth-noise seed")
    parser.add_argument("--text", nargs="+", default=None, metavar="FILE",
                        help="corpus (.txt[.gz]/.jsonl[.gz]); default: the shipped KJV Bible")


def run(args: argparse.Namespace) -> int:
    if args.ranks is not None and args.ranks < 1:
        raise SystemExit("--ranks must be >= 1")
    run_repro(workdir=args.workdir, size=args.size, tiny=args.tiny, ranks=args.ranks, texts=args.text,
              seed=args.seed)
    return 0
