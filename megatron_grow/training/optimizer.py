"""Megatron-Core DDP, optimizer and LR schedule from a recipe.

The optimizer is MCore's ``get_megatron_optimizer`` (AdamW; the distributed optimizer
shards its state over data-parallel ranks), wrapped around MCore
``DistributedDataParallel`` chunks, on GPU and on CPU alike: CPU mode
(``megatron_grow.platform.cpu``) makes its CUDA-only calls run on CPU tensors, so CPU tests
exercise the same code path as GPU runs. What differs on CPU: fp32 instead of bf16, and no
TE/apex fused kernels (MCore falls back to ``torch.optim.AdamW``).

The LR schedule is MCore's ``OptimizerParamScheduler`` stepped once per iteration, counting
from the start of the schedule: a fresh run, or -- after growth -- the first step of the
grown model (the recipe's warmup is then a re-warmup, and its decay spans the remaining
iterations).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_grow.config.schema import Recipe


def wrap_ddp(chunks: Sequence[torch.nn.Module], recipe: Recipe) -> list:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=recipe.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=True,  # MCore raises before the optimizer step; the trainer reports it
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(chunk.config, ddp_config, chunk,
                                               disable_bucketing=i > 0))
    return wrapped


def build_optimizer(chunks: Sequence[torch.nn.Module], recipe: Recipe, params_dtype: torch.dtype):
    t = recipe.training
    config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        use_distributed_optimizer=recipe.parallel.use_distributed_optimizer,
        bf16=params_dtype == torch.bfloat16,
        fp16=False,
        params_dtype=params_dtype,
    )
    return get_megatron_optimizer(config, list(chunks))


def warmup_iters(recipe: Recipe, restarted: bool) -> int:
    """The warmup of a schedule: ``lr_rewarmup_iters`` (when set) for one that restarts at a growth
    point (``restarted``: it starts at an iteration > 0), else ``lr_warmup_iters``."""
    t = recipe.training
    return t.lr_rewarmup_iters if restarted and t.lr_rewarmup_iters is not None else t.lr_warmup_iters


def build_scheduler(optimizer, recipe: Recipe, schedule_steps: int, override: bool = False,
                    restarted: bool = False):
    """LR/WD schedule over ``schedule_steps`` iterations (counted from the schedule's start).

    A scheduler state loaded later keeps its own values, unless ``override`` (then the recipe's
    values win and only the step count is taken from the state, as Megatron-LM's
    ``--override-opt_param-scheduler``). ``restarted``: the schedule starts at a growth point
    (iteration > 0), so its warmup is ``lr_rewarmup_iters`` when set."""
    t = recipe.training
    steps = max(schedule_steps, 1)
    warmup = min(warmup_iters(recipe, restarted), steps)
    style = t.lr_decay_style
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=steps,
        lr_decay_style=style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not override,
        override_opt_param_scheduler=override,
        wsd_decay_steps=t.lr_wsd_decay_iters if style == "WSD" else None,
        lr_wsd_decay_style=t.lr_wsd_decay_style if style == "WSD" else None,
    )
