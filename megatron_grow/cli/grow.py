"""Grow a torch_dist MoE checkpoint in depth and/or width, into any parallel layout.

    torchrun --nproc-per-node 4 -m megatron_grow grow --load SRC --save DST \\
        --recipe configs/growth/tiny_depth_width.yaml --expert-model-parallel-size 2

SRC and DST use the Megatron-LM layout (iter_NNNNNNN/ + latest_checkpointed_iteration.txt).
The source architecture is the one SRC records (megatron_grow.json, or Megatron-LM args in
common.pt); --source-config RECIPE.yaml overrides it; otherwise the recipe's model: section
is used. The grown model is built in the target layout (the recipe's parallel: section,
then the flags below) and every rank reads only its own slices of SRC. SRC is never
modified; DST appears only once complete. Ends with --verify (on by default): logits KL,
top-1 agreement and routing load of grown vs source on a probe batch.
"""

from __future__ import annotations

import argparse

from megatron_grow.cli._common import add_layout_arguments, add_override_argument, layout_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="source checkpoint root (or an iter_N directory)")
    parser.add_argument("--save", required=True, help="destination root for the grown checkpoint")
    parser.add_argument("--recipe", required=True, help="YAML recipe with a growth: section")
    parser.add_argument("--source-config", default=None,
                        help="recipe whose model: section describes SRC (when SRC does not record it)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the probe-batch comparison of grown vs source")
    parser.add_argument("--quiet", action="store_true", help="no per-group progress lines")
    add_layout_arguments(parser)
    add_override_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_grow.config.loader import load_recipe, recipe_to_dict
    from megatron_grow.errors import GrowthError
    from megatron_grow.growth.grow import grow_checkpoint, print_summary
    from megatron_grow.growth.verify import format_metrics, verify_growth
    from megatron_grow.parallel.init import destroy_distributed

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.growth is None:
        raise GrowthError(f"{args.recipe} has no growth: section (see configs/growth/ for examples)")
    source_model = load_recipe(args.source_config).model if args.source_config else None
    parallel = layout_from_args(args, recipe.parallel)
    try:
        summary = grow_checkpoint(args.load, args.save, recipe.growth, parallel, source_model=source_model,
                                  recipe_dict=recipe_to_dict(recipe), overwrite=args.overwrite,
                                  seed=recipe.training.seed, progress=not args.quiet)
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if rank0:
            print_summary(summary)
        if args.verify:
            metrics = verify_growth(args.load, args.save, parallel)
            if rank0:
                print(format_metrics(metrics))
    finally:
        destroy_distributed()
    return 0
