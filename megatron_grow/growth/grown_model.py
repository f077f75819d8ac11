"""The architecture of a grown checkpoint, for the runs that train it on.

A run that resumes a grown checkpoint (after ``megatron-grow grow``, or a requeue after growth
on load) gives the *source* model and the growth operators in its recipe; the weights on disk
are the grown model's. This is the one place that answers "which model do I build to load
them": the architecture the checkpoint records, else the source grown by the operators.
"""

from __future__ import annotations

from megatron_grow.checkpoint import paths
from megatron_grow.checkpoint.manifest import read_checkpoint_info
from megatron_grow.config.schema import GrowthConfig, ModelConfig
from megatron_grow.growth.plan import make_growth_plan


def grown_model_of(checkpoint_root: str, source_model: ModelConfig, growth: GrowthConfig) -> ModelConfig:
    """The model of the grown checkpoint under ``checkpoint_root`` (its tracker's iteration).

    Args:
        checkpoint_root: a run directory holding the grown checkpoint.
        source_model: the recipe's ``model:`` (the source).
        growth: the recipe's ``growth:`` (validated as any growth plan is).

    Returns:
        The architecture the checkpoint records (``megatron_grow.json`` or Megatron-LM args), else
        ``source_model`` grown by ``growth``.
    """
    ckpt_dir, iteration = paths.resolve_checkpoint_dir(checkpoint_root)
    recorded = read_checkpoint_info(ckpt_dir, iteration).model
    return recorded if recorded is not None else make_growth_plan(source_model, growth).target
