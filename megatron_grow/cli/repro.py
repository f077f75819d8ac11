"""The paper's findings, their controls and the growth options, at small scale over seeds.

    megatron-grow repro --size cpu --jobs 3             # 5 seeds on 2 CPU cores (docs/results.md)
    megatron-grow repro --tiny                          # CI: the machinery, not the science
    megatron-grow repro --size gpu --dry-run            # write and check every recipe, estimate, train nothing
    megatron-grow repro --report-only --raw docs/results/repro_cpu --report-dir docs   # rebuild docs/results.md
    megatron-grow repro [--workdir runs/repro] [--tiny] [--size gpu|cpu|auto] [--seeds N ...] [--ranks N]
                        [--jobs N] [--no-downstream] [--dry-run] [--report-only] [--raw DIR] [--report-dir DIR]
                        [--text FILE ...]

Trains one base per seed (saved near 0.25, 0.5, 1 and 2 F_c) on the corpus without the books the
held-out task is drawn from, grows it in the ways the findings and options compare, trains every
run on with the same batch on the same validation tokens, scores the key final checkpoints on the
held-out task, writes the raw records (WORKDIR/raw/) and from them WORKDIR/results.md and its plots.
"""

from __future__ import annotations

import argparse

from megatron_grow.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/repro", help="where data, checkpoints and results go")
    parser.add_argument("--tiny", action="store_true", help="CI scale (every finding, a few steps each)")
    parser.add_argument("--size", choices=("cpu", "gpu", "auto"), default="auto",
                        help="model and step sizes (auto: gpu when CUDA is available); ignored with --tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="N",
                        help="seeds of init, data order and growth noise (default: the size's, 3 for cpu/gpu)")
    parser.add_argument("--ranks", type=int, default=None, metavar="N",
                        help="processes per seed (default: the size's on CPU, one per GPU)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="seeds trained side by side (default: cores / ranks on CPU, 1 on GPU)")
    parser.add_argument("--no-downstream", action="store_true", help="skip the cloze scoring of final checkpoints")
    parser.add_argument("--dry-run", action="store_true", help="write and validate every recipe, print the plan, "
                        "train nothing")
    parser.add_argument("--report-only", action="store_true", help="rebuild results.md, results.json and the "
                        "plots from the raw records (--raw, default WORKDIR/raw), train nothing")
    parser.add_argument("--raw", default=None, metavar="DIR",
                        help="--report-only: the raw records (study.json, seed_<seed>.json), e.g. "
                             "docs/results/repro_cpu")
    parser.add_argument("--report-dir", default=None, metavar="DIR",
                        help="where results.md and img/ go (default: WORKDIR), e.g. docs")
    parser.add_argument("--text", nargs="+", default=None, metavar="FILE",
                        help="corpus (.txt[.gz]/.jsonl[.gz]); default: the shipped KJV Bible without the books "
                             "the held-out downstream task is drawn from")


def run(args: argparse.Namespace) -> int:
    from megatron_grow.experiments.repro import run_repro

    for flag in ("ranks", "jobs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserInputError(f"--{flag} must be >= 1")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        raise UserInputError(f"--seeds has repeats: {args.seeds}")
    run_repro(workdir=args.workdir, size=args.size, tiny=args.tiny, ranks=args.ranks, texts=args.text,
              seeds=args.seeds, jobs=args.jobs, dry_run=args.dry_run, downstream=not args.no_downstream,
              report_only=args.report_only, raw_dir=args.raw, report_dir=args.report_dir)
    return 0
