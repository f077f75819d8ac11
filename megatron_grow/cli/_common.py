"""Arguments shared by several subcommands: parallel-layout flags and recipe overrides."""

from __future__ import annotations

import argparse
import dataclasses
import math

from megatron_grow.config.check import layout_problems
from megatron_grow.config.schema import ParallelConfig, Recipe
from megatron_grow.errors import LayoutError, UserInputError

LAYOUT_FLAGS = {
    "tensor_model_parallel_size": "--tensor-model-parallel-size",
    "pipeline_model_parallel_size": "--pipeline-model-parallel-size",
    "virtual_pipeline_model_parallel_size": "--virtual-pipeline-model-parallel-size",
    "expert_model_parallel_size": "--expert-model-parallel-size",
    "expert_tensor_parallel_size": "--expert-tensor-parallel-size",
}


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallel layout (overrides the recipe's parallel: section)")
    for field, flag in LAYOUT_FLAGS.items():
        group.add_argument(flag, dest=field, type=int, default=None, metavar="N")


def layout_from_args(args: argparse.Namespace, base: ParallelConfig) -> ParallelConfig:
    """The recipe's layout with any command-line flags applied (and re-validated by the caller)."""
    changes = {f: getattr(args, f) for f in LAYOUT_FLAGS if getattr(args, f, None) is not None}
    return dataclasses.replace(base, **changes)


def checked_layout(args: argparse.Namespace, recipe: Recipe) -> ParallelConfig:
    """The recipe's layout with the flags applied, checked against the model the recipe builds
    (the grown one for a growth recipe) by the same function that checks the recipe itself."""
    parallel = layout_from_args(args, recipe.parallel)
    problems = layout_problems(recipe, parallel)
    if problems:
        raise LayoutError("; ".join(problems))
    return parallel


def add_verify_threshold_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("verify thresholds (exit 4 when one fails)")
    group.add_argument("--max-kl", type=float, default=None, metavar="X",
                       help="largest acceptable mean KL(source || grown) on the probe batch")
    group.add_argument("--min-routing-share", type=float, default=None, metavar="X",
                       help="least share of routed tokens the copied experts must get (width growth)")


def check_verify_thresholds(args: argparse.Namespace) -> None:
    """Thresholds no result can meet (or that every result meets) are bad input, named before any work:
    a KL divergence is >= 0, a share of tokens is in [0, 1]; NaN compares false with everything."""
    max_kl, share = args.max_kl, args.min_routing_share
    if max_kl is not None and not (math.isfinite(max_kl) and max_kl >= 0):
        raise UserInputError(f"--max-kl must be a finite number >= 0 (a KL divergence), got {max_kl}")
    if share is not None and not 0 <= share <= 1:
        raise UserInputError(f"--min-routing-share must be between 0 and 1 (a share of routed tokens), got {share}")


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="recipe overrides, e.g. growth.width.alpha=0.05")
