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
import time

from megatron_grow.config.check import layout_problems
from megatron_grow.config.loader import load_recipe
from megatron_grow.errors import GrowthError

DEFERS_STOP_SIGNALS = True  # a preemption notice during start-up makes the run save after its first step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--grow-from", default=None, metavar="SRC",
                        help="grow this checkpoint with the recipe's growth: section, then train")
    parser.add_argument("--source-config", default=None,
                        help="recipe whose model: section describes SRC (when SRC does not record it)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")


def run(args: argparse.Namespace) -> int:
    from megatron_grow.growth.grown_model import grown_model_of
    from megatron_grow.parallel.init import destroy_distributed
    from megatron_grow.training.checkpointing import has_checkpoint
    from megatron_grow.training.resume import check_resume_architecture, check_save_vs_source
    from megatron_grow.training.trainer import Trainer, check_data_inputs

    recipe = load_recipe(args.config, args.overrides)
    check_save_vs_source(recipe.checkpoint.save, args.grow_from)  # before anything is read or built
    model, initialize = recipe.model, None
    if has_checkpoint(recipe.checkpoint.load) and recipe.growth is not None:
        # Resuming a grown run (after an offline grow, or a requeue after online growth): the
        # weights are the grown model's, whose architecture the checkpoint records.
        model = grown_model_of(recipe.checkpoint.load, recipe.model, recipe.growth)
        if args.grow_from:
            print(f"[train] {recipe.checkpoint.load} has a checkpoint: resuming it, --grow-from is not applied "
                  "again", flush=True)
    elif args.grow_from:
        if recipe.growth is None:
            raise GrowthError(f"--grow-from needs a growth: section in {args.config}")
        model, initialize = growth_initializer(args, recipe)
    elif recipe.growth is not None and not has_checkpoint(recipe.checkpoint.load):
        raise GrowthError(f"{args.config} has a growth: section; pass --grow-from SRC (or use megatron-grow grow)")
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


def growth_initializer(args: argparse.Namespace, recipe):
    """Growth on load of ``args.grow_from`` as the trainer's weight initializer (the CLI composes
    growth and training, which never import each other): (grown model, initialize callback)."""
    from megatron_grow.growth import optimizer_state
    from megatron_grow.growth.grow import grow_load_into, prepare_growth
    from megatron_grow.parallel.collectives import print_rank0
    from megatron_grow.training.checkpointing import load_optimizer_in_memory
    from megatron_grow.training.resume import grow_from_source_model

    source_model = load_recipe(args.source_config).model if args.source_config else None
    source = prepare_growth(args.grow_from, recipe.growth, source_model)
    if source_model is None:  # the recipe's model: must describe the source (or be left out)
        grow_from_source_model(recipe.model, source.info.model, args.grow_from, print_rank0)
    # The recipe's check, against the source this run actually grows (its resolved architecture).
    problems = layout_problems(dataclasses.replace(recipe, model=source.plan.source))
    if problems:
        raise GrowthError("this run's layout does not fit the grown model: " + "; ".join(problems))
    started = time.perf_counter()

    def load_optimizer(optimizer, chunks):  # growth.optimizer: carry: Adam state grown like the weights
        load_optimizer_in_memory(optimizer, chunks,
                                 lambda tensors: optimizer_state.fill_grown_optimizer_tensors(tensors, source),
                                 optimizer_state.carried_common_state(source.ckpt_dir))

    def initialize(raw_chunks):
        grown = grow_load_into(raw_chunks, source, started)
        if optimizer_state.carries(recipe.growth):
            grown["load_optimizer"] = load_optimizer
        return grown

    return source.plan.target, initialize
