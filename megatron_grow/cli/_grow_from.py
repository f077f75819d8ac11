"""Every rule of ``megatron-grow train --grow-from SRC``, in one place.

How a training run starts, given its recipe, ``checkpoint.load`` and ``--grow-from``:

1. ``checkpoint.save`` may not be (inside, or around) the ``--grow-from`` source, and must be
   writable: checked before anything is read or built.
2. ``checkpoint.load`` has a checkpoint: resume it. With a ``growth:`` section the weights are the
   grown model's (after ``megatron-grow grow``, or a requeue after growth on load), whose
   architecture the checkpoint records; ``--grow-from`` is not applied again (said once).
3. Else ``--grow-from SRC`` needs a ``growth:`` section: SRC is resolved and the plan checked
   (``growth.grow.prepare_growth``: every problem before any tensor is read); the recipe's
   ``model:`` must describe SRC or be left at the defaults; the run's layout must fit the grown
   model; the trainer's weights come from growth on load, and it starts from the
   :class:`~megatron_grow.checkpoint.grown_start.GrownStart` growth returns.
4. Else a ``growth:`` section without a checkpoint to resume is an error (pass ``--grow-from`` or
   use ``megatron-grow grow``).

Imported by ``cli/train.py`` only once the command line has been checked (it loads torch and
Megatron-Core). The CLI composes growth and training, which never import each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

from megatron_grow.checkpoint import paths
from megatron_grow.checkpoint.grown_start import GrownStart
from megatron_grow.config.check import layout_problems
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ModelConfig, Recipe
from megatron_grow.errors import GrowthError
from megatron_grow.growth import optimizer_state
from megatron_grow.growth.grow import grow_load_into, prepare_growth
from megatron_grow.growth.grown_model import grown_model_of
from megatron_grow.parallel.collectives import print_rank0
from megatron_grow.training.checkpointing import has_checkpoint, load_optimizer_in_memory
from megatron_grow.training.resume import architecture_differences

Initializer = Callable[[list], GrownStart]


def check_save_vs_source(save: str | None, grow_from: str | None) -> None:
    """Training never writes into (or over) the checkpoint it grows from (rule 1)."""
    if not save:
        return
    paths.check_destination(save, "checkpoint.save", [("the --grow-from source", grow_from)], GrowthError)
    paths.probe_writable(save, "checkpoint.save")


def grow_from_source_model(recipe_model: ModelConfig, recorded: ModelConfig | None, source: str,
                           log: Callable[[str], None]) -> None:
    """--grow-from: the recipe's model: section must describe the source, or be left at the defaults."""
    if recorded is None:
        return
    diffs = architecture_differences(recorded, recipe_model)
    if not diffs:
        return
    if recipe_model == ModelConfig():
        log(f"[train] the recipe has no model: section; growing {source} as the architecture it records "
            f"({recorded.num_layers} layers, {recorded.num_moe_experts} experts)")
        return
    raise GrowthError(f"--grow-from {source}: the recipe's model: section (the source description) differs from "
                      "the architecture the source records (" + "; ".join(diffs) + "); fix model: in the recipe, "
                      "or pass --source-config to say which is right")


def start_of_run(args: argparse.Namespace, recipe: Recipe) -> tuple[ModelConfig, Initializer | None]:
    """The model a ``train`` run builds and where its weights come from (the module docstring's rules).

    Args:
        args: ``train``'s arguments (``config``, ``grow_from``, ``source_config``).
        recipe: the loaded recipe.

    Returns:
        (model to build, the trainer's ``initialize`` callback or None for resume / random init).

    Raises:
        GrowthError: a rule is broken (one line naming it).
    """
    check_save_vs_source(recipe.checkpoint.save, args.grow_from)  # before anything is read or built
    resuming = has_checkpoint(recipe.checkpoint.load)
    if resuming and recipe.growth is not None:
        if args.grow_from:
            print(f"[train] {recipe.checkpoint.load} has a checkpoint: resuming it, --grow-from is not applied "
                  "again", flush=True)
        return grown_model_of(recipe.checkpoint.load, recipe.model, recipe.growth), None
    if args.grow_from:
        if recipe.growth is None:
            raise GrowthError(f"--grow-from needs a growth: section in {args.config}")
        return growth_initializer(args, recipe)
    if recipe.growth is not None and not resuming:
        raise GrowthError(f"{args.config} has a growth: section; pass --grow-from SRC (or use megatron-grow grow)")
    return recipe.model, None


def growth_initializer(args: argparse.Namespace, recipe: Recipe) -> tuple[ModelConfig, Initializer]:
    """Growth on load of ``args.grow_from`` as the trainer's weight initializer (rule 3):
    (grown model, initialize callback)."""
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

    def initialize(raw_chunks) -> GrownStart:
        grown = grow_load_into(raw_chunks, source, started)
        return grown.with_optimizer_loader(load_optimizer) if optimizer_state.carries(recipe.growth) else grown

    return source.plan.target, initialize
