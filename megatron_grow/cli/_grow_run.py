"""The work of ``megatron-grow grow`` (imported only once the command line has been checked:
``cli/grow.py`` answers ``--help``, argument and recipe errors before torch and Megatron-Core load)."""

from __future__ import annotations

import argparse
import dataclasses
import os

from megatron_grow.checkpoint import paths
from megatron_grow.checkpoint.architecture import resolve_architecture
from megatron_grow.cli._common import checked_layout
from megatron_grow.config.loader import recipe_to_dict
from megatron_grow.config.schema import Recipe
from megatron_grow.growth.capacity import check_capacity
from megatron_grow.growth.grow import grow_checkpoint, prepare_destination, print_summary
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
    check_capacity(source_model, recipe.growth, ckpt_dir, args.save, with_verify=args.verify, dtype=args.dtype)
    parallel = checked_layout(args, dataclasses.replace(recipe, model=source_model))
    prepare_destination(args.save, args.overwrite, args.load)  # before the lock file goes beside --save
    lock = _lock_destination(args.save)
    try:
        summary = grow_checkpoint(args.load, args.save, recipe.growth, parallel, source_model=source_model,
                                  recipe_dict=recipe_to_dict(recipe), overwrite=args.overwrite,
                                  seed=recipe.training.seed, progress=not args.quiet,
                                  target_spec=args.target_spec, dtype=args.dtype,
                                  check_staged=_verifier(args, parallel, source_model) if args.verify else None)
        if is_rank0():
            print_summary(summary)
    finally:
        destroy_distributed()
        if lock is not None:
            lock.release()
    return 0


def _lock_destination(save: str) -> paths.DestinationLock | None:
    """Rank 0 owns --save for the whole grow (a second grow to it is refused, naming this one), and
    removes what killed grows to it left behind."""
    if os.environ.get("RANK", "0") != "0":
        return None
    lock = paths.DestinationLock(save, "grow").acquire()
    removed = paths.remove_stale_staging(save)
    if removed:
        print(f"[grow] removed {len(removed)} staging director{'y' if len(removed) == 1 else 'ies'} left by an "
              f"interrupted grow to {save}: {', '.join(os.path.basename(r) for r in removed)}", flush=True)
    return lock


def _verifier(args, parallel, source_model):
    """Verify the grown checkpoint while it is still staged beside --save: --save is replaced only
    when it passes, so a failed verify (an error, a threshold, Ctrl-C) leaves the old --save as it was."""

    def check(staged_root: str) -> None:
        try:
            metrics = verify_growth(args.load, staged_root, parallel, source_model=source_model)
            if is_rank0():
                print(format_metrics(metrics))
            check_thresholds(metrics, args.max_kl, args.min_routing_share)
        except BaseException:
            if is_rank0():
                print(f"[grow] verify failed: the grown checkpoint was discarded; {args.save} is unchanged",
                      flush=True)
            raise

    return check
