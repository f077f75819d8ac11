"""Sunk FLOPs of a checkpoint vs Chinchilla compute, the paper's advice, and growth budgets.

    megatron-grow flops runs/base
    megatron-grow flops runs/base --grow-recipe configs/growth/17b_to_35b.yaml --extra-tokens 300e9
    megatron-grow flops runs/base/iter_0016000 --json

Sunk FLOPs = the checkpoint's flops_so_far counter (Megatron-LM's
num_floating_point_operations_so_far), or, when it records none, consumed_tokens x training
FLOPs/token of its architecture ("estimated"). F_c = 6 N_a x 20 N_a with N_a the activated
parameters (the paper's count, both embeddings). Advice (arXiv 2510.08008): interposition,
clearly better than stacking past ~1x F_c; continued training >= ~1x sunk FLOPs; grow from a
constant-LR checkpoint. With --grow-recipe the recipe's growth: section is applied to the
checkpoint's architecture: grown FLOPs/token, and with --extra-tokens the grown run's extra and
total FLOPs against a from-scratch run of the grown model with the same extra (the paper's
comparison) or the same total FLOPs.
"""

from __future__ import annotations

import argparse
import json

from megatron_grow.errors import UserInputError


def _tokens(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of tokens: {text!r}") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"--extra-tokens must be a non-negative whole number, got {text!r}")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="run root or iter_N directory")
    parser.add_argument("--grow-recipe", default=None, metavar="R.yaml", help="recipe whose growth: section to plan")
    parser.add_argument("--extra-tokens", type=_tokens, default=None, metavar="N",
                        help="tokens of continued training (e.g. 300e9)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for --grow-recipe")


def run(args: argparse.Namespace) -> int:
    from megatron_grow.analysis.sunk_cost import flops_report, format_flops_report

    if args.overrides and not args.grow_recipe:
        raise UserInputError("recipe overrides given without --grow-recipe")
    report = flops_report(args.checkpoint, args.grow_recipe, args.extra_tokens, args.overrides)
    print(json.dumps(report, sort_keys=True) if args.json else format_flops_report(report))
    return 0
