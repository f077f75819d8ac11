"""The work of ``megatron-grow grow`` (imported only once the command line has been checked:
``cli/grow.py`` answers ``--help``, argument and recipe errors before torch and Megatron-Core load)."""

from __future__ import annotations

import argparse
import dataclasses

from megatron_grow.checkpoint import paths
from megatron_grow.checkpoint.architecture import resolve_architecture
from megatron_grow.cli._common import checked_layout
from megatron_grow.config.loader import recipe_to_dict
from megatron_grow.config.schema import Recipe
from megatron_grow.growth.capacity import check_capacity
from megatron_grow.growth.grow import discard_grown, grow_checkpoint, print_summary
from megatron_grow.growth.verify import check_thresholds, format_metrics, verify_growth
from megatron_grow.parallel.collectives import is_rank0
from megatron_grow.parallel.init import destroy_distributed
from megatron_grow.platform import cpu


def run(args: argparse.Namespace, recipe: Recipe) -> int:
    cpu.apply_cpu_adaptations()  # cli/grow.py defers it to here (a no-op with CUDA)
    # SRC's architecture, resolved once: the layout is checked against the model grown from it,
    # and the growth and its verify use it.
    ckpt_dir = paths.resolve_checkpoint_dir(args.load)[0]
    source_model, _ = resolve_architecture(ckpt_dir, args.source_config)
    # Before any index map or module is built: a grown model this machine cannot hold is refused.
    check_capacity(source_model, recipe.growth, ckpt_dir, args.save, with_verify=args.verify)
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
