"""Train (or resume, or grow then train) a model from a recipe.

    torchrun --nproc-per-node 2 -m megatron_grow train --config RECIPE.yaml [key.sub=value ...]
    torchrun --nproc-per-node 2 -m megatron_grow train --config GROWTH_RECIPE.yaml --grow-from SRC

Resumes from the tracker under ``checkpoint.load`` when there is one. Otherwise, with
``--grow-from``, the recipe's ``growth:`` section is applied to SRC at start-up, in this
run's layout (growth on load, no intermediate checkpoint), and training continues from
SRC's counters; the first save writes the grown model. Exit codes: 0 done, 2 bad input,
3 stopped by SIGTERM/SIGUSR1 after saving (requeue).
"""

from __future__ import annotations

import argparse
import dataclasses

from megatron_grow.config.loader import load_recipe

DEFERS_STOP_SIGNALS = True  # a preemption notice during start-up makes the run save after its first step
FORKED_CHILDREN_DIE_WITH_IT = True  # MCore's checkpoint writer helpers die with a killed trainer (parallel/lifetime.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--grow-from", default=None, metavar="SRC",
                        help="grow this checkpoint with the recipe's growth: section, then train")
    parser.add_argument("--source-config", default=None,
                        help="recipe whose model: section describes SRC (when SRC does not record it)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")


def run(args: argparse.Namespace) -> int:
    from megatron_grow.cli._grow_from import start_of_run
    from megatron_grow.parallel.init import destroy_distributed
    from megatron_grow.training.checkpointing import has_checkpoint
    from megatron_grow.training.resume import check_resume_architecture
    from megatron_grow.training.trainer import Trainer, check_data_inputs

    recipe = load_recipe(args.config, args.overrides)
    model, initialize = start_of_run(args, recipe)  # every --grow-from rule: cli/_grow_from.py
    # How experts run is this run's choice, not the checkpoint's: the recipe's backend applies.
    model = dataclasses.replace(model, moe_expert_backend=recipe.model.moe_expert_backend)
    if has_checkpoint(recipe.checkpoint.load):
        check_resume_architecture(recipe.checkpoint.load, model)
    check_data_inputs(recipe, model)  # before any process group, model or growth load
    try:
        result = Trainer(recipe, model=model, initialize=initialize).run()
    finally:
        destroy_distributed()
    return result.exit_code
