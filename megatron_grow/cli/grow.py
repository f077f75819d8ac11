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
A grown model larger than the free disk at DST (or, verifying on a CPU, than the available
memory) is refused with the sizes before anything is built (growth/capacity.py).
"""

from __future__ import annotations

import argparse

from megatron_grow.checkpoint import keys, paths
from megatron_grow.cli._common import (
    add_layout_arguments,
    add_override_argument,
    add_verify_threshold_arguments,
    check_verify_thresholds,
)
from megatron_grow.config.loader import load_recipe
from megatron_grow.errors import GrowthError

INSTALLS_CPU_MODE = True  # in _grow_run, after the cheap checks (so errors answer before torch loads)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="source checkpoint root (or an iter_N directory)")
    parser.add_argument("--save", required=True, help="destination root for the grown checkpoint")
    parser.add_argument("--recipe", required=True, help="YAML recipe with a growth: section")
    parser.add_argument("--source-config", default=None,
                        help="recipe whose model: section describes SRC (wins over what SRC records)")
    parser.add_argument("--target-spec", choices=keys.SPECS, default=None,
                        help="layer-spec names to store the grown checkpoint under (default: the spec this "
                             "machine trains with: te with Transformer Engine on a GPU, else local)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the grown weights' stored dtype (default auto: SRC's, so a bf16 SRC grows into a "
                             "bf16 DST); noise is added in fp32 and rounded once")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the probe-batch comparison of grown vs source")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_verify_threshold_arguments(parser)
    add_layout_arguments(parser)
    add_override_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Check what is cheap to check (recipe, flags, SRC exists), then import and run the growth."""
    check_verify_thresholds(args)
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.growth is None:
        raise GrowthError(f"{args.recipe} has no growth: section (see configs/growth/ for examples)")
    if not args.verify and (args.max_kl is not None or args.min_routing_share is not None):
        raise GrowthError("--max-kl/--min-routing-share need the verify step; drop --no-verify")
    paths.resolve_checkpoint_dir(args.load)  # a missing SRC is named before the slow imports
    # Deferred on purpose: torch + Megatron-Core take seconds to import, and --help, argument and
    # recipe errors should not wait for them.
    from megatron_grow.cli import _grow_run

    return _grow_run.run(args, recipe)
