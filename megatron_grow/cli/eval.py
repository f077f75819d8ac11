"""Downstream accuracy of a checkpoint with lm-evaluation-harness (exported on the fly to HF format).

    megatron-grow eval --load ROOT --tasks kjv_cloze [--tokenizer TOKENIZER] [--limit N]

kjv_cloze (200 verse-completion questions, 4 choices, data/eval/kjv_cloze/) ships with the
repository and needs no network; any other lm-eval task name works where its dataset is
cached. The tokenizer is the one recorded by import-hf (also through growth), or --tokenizer:
an HF tokenizer directory or a sentencepiece .model from train-tokenizer. Prints accuracy
with its standard error per task.
"""

from __future__ import annotations

import argparse

from megatron_grow.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="checkpoint root (or an iter_N directory)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. kjv_cloze")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer directory or sentencepiece .model")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples per task")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="torch device for the HF model (cpu, cuda, ...)")
    parser.add_argument("--architecture", default=None, help="transformers class to export as (see export-hf)")
    parser.add_argument("--quiet", action="store_true", help="no export progress bar")


def run(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserInputError(f"--tasks names no task ({args.tasks!r}); give comma-separated lm-eval task names, "
                             "e.g. kjv_cloze")
    if args.limit is not None and args.limit < 1:
        raise UserInputError(f"--limit must be >= 1 (examples per task), got {args.limit}")
    if args.batch_size < 1 or args.num_fewshot < 0:
        raise UserInputError(f"--batch-size must be >= 1 and --num-fewshot >= 0, got {args.batch_size} and "
                             f"{args.num_fewshot}")
    from megatron_grow.interop.evaluate import evaluate_checkpoint  # torch + transformers: after the checks

    scores = evaluate_checkpoint(args.load, tasks, tokenizer=args.tokenizer, limit=args.limit,
                                 num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
                                 architecture=args.architecture, progress=not args.quiet)
    print(f"eval summary: {args.load}")
    print(f"  {'task':<16} {'metric':<10} {'value':>8} {'stderr':>8} {'n':>6}")
    for s in scores:
        stderr = f"{s.stderr:.4f}" if s.stderr is not None else "n/a"
        print(f"  {s.task:<16} {s.metric:<10} {s.value:>8.4f} {stderr:>8} {s.samples:>6}")
    return 0
