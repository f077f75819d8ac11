"""Grow a torch_dist MoE checkpoint in depth and/or width, into any parallel layout.

    torchrun --nproc-per-node 4 -m megatron_grow grow --load SRC --save DST \\
        --recipe configs/growth/tiny_depth_width.yaml --expert-model-parallel-size 2

SRC and DST use the Megatron-LM layout (iter_NNNNNNN/ + latest_checkpointed_iteration.txt).
SRC's architecture: --source-config RECIPE.yaml when given, else megatron_grow.json, else the
Megatron-LM args in common.pt (checkpoint/architecture.py). SRC may be stored under the TE or
the local layer spec's names; DST is written under --target-spec's. The grown model is built
in the target layout (the recipe's parallel: section, then the flags below, both checked
against the grown model) and every rank reads only its own slices of SRC. SRC is never
modified; DST appears only once complete. Ends with verify (on by default): logits KL, top-1
agreement and routing load of grown vs source on a probe batch; if it fails (an error, or
--max-kl / --min-routing-share not met: exit 4) the grown checkpoint is removed again.
"""

from __future__ import annotations

import argparse
import dataclasses

from megatron_grow.checkpoint import keys, paths
from megatron_grow.checkpoint.architecture import resolve_architecture
from megatron_grow.cli._common import (
    add_layout_arguments,
    add_override_argument,
    add_verify_threshold_arguments,
    checked_layout,
)
from megatron_grow.config.loader import load_recipe, recipe_to_dict
from megatron_grow.errors import GrowthError
from megatron_grow.growth.grow import discard_grown, grow_checkpoint, print_summary
from megatron_grow.growth.verify import check_thresholds, format_metrics, verify_growth
from megatron_grow.parallel.collectives import is_rank0
from megatron_grow.parallel.init import destroy_distributed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="source checkpoint root (or an iter_N directory)")
    parser.add_argument("--save", required=True, help="destination root for the grown checkpoint")
    parser.add_argument("--recipe", required=True, help="YAML recipe with a growth: section")
    parser.add_argument("--source-config", default=None,
                        help="recipe whose model: section describes SRC (wins over what SRC records)")
    parser.add_argument("--target-spec", choices=keys.SPECS, default=None,
                        help="layer-spec names to store the grown checkpoint under (default: the spec this "
                             "machine trains with: te with Transformer Engine on a GPU, else local)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the probe-batch comparison of grown vs source")
    parser.add_argument("--quiet", action="store_true", help="no per-group progress lines")
    add_verify_threshold_arguments(parser)
    add_layout_arguments(parser)
    add_override_argument(parser)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.growth is None:
        raise GrowthError(f"{args.recipe} has no growth: section (see configs/growth/ for examples)")
    if not args.verify and (args.max_kl is not None or args.min_routing_share is not None):
        raise GrowthError("--max-kl/--min-routing-share need the verify step; drop --no-verify")
    # SRC's architecture, resolved once: the layout is checked against the model grown from it,
    # and the growth and its verify use it.
    source_model, _ = resolve_architecture(paths.resolve_checkpoint_dir(args.load)[0], args.source_config)
    parallel = checked_layout(args, dataclasses.replace(recipe, model=source_model))
    try:
        summary = grow_checkpoint(args.load, args.save, recipe.growth, parallel, source_model=source_model,
                                  recipe_dict=recipe_to_dict(recipe), overwrite=args.overwrite,
                                  seed=recipe.training.seed, progress=not args.quiet,
                                  target_spec=args.target_spec)
        if is_rank0():
            print_summary(summary)
        if args.verify:
            _verify_or_discard(args, parallel, summary)
    finally:
        destroy_distributed()
    return 0


def _verify_or_discard(args, parallel, summary: dict) -> None:
    """Verify with the architecture the growth used; on any failure DST is removed, so a non-zero
    exit never leaves a checkpoint that looks valid."""
    try:
        metrics = verify_growth(args.load, args.save, parallel, source_model=summary["source_model"])
        if is_rank0():
            print(format_metrics(metrics))
        check_thresholds(metrics, args.max_kl, args.min_routing_share)
    except BaseException:
        discard_grown(args.save, summary["iteration"])
        if is_rank0():
            print(f"[grow] verify failed: removed the grown checkpoint from {args.save}", flush=True)
        raise
