"""Training checkpoints in the Megatron-LM layout, readable by Megatron-LM.

One checkpoint (``iter_NNNNNNN/``, torch_dist) holds:

================================  ==========================================================
entry                             contents
================================  ==========================================================
``model`` (``model0``.. w/ VPP)   sharded model weights (MCore storage keys)
``optimizer``                     MCore distributed/FP32 optimizer, ``dp_reshardable`` format
``opt_param_scheduler``           MCore scheduler state
``rng_state``                     per-rank RNG (CPU, CUDA, MCore tracker), ShardedObject
``iteration``, ``checkpoint_version``, ``num_floating_point_operations_so_far``  as Megatron-LM
``args``                          an ``argparse.Namespace`` with Megatron-LM argument names
``megatron_grow``                 our manifest: recipe, counters, lineage (also megatron_grow.json)
================================  ==========================================================

Saves go through ``checkpoint.io.save_checkpoint`` (atomic: staging dir, fsync, rename,
tracker last; keep the newest N). The optimizer's ``dp_reshardable`` format resumes at the
same TP/PP/EP layout with any DP size; the model weights load at any layout.
"""

from __future__ import annotations

import argparse
import os
import random
import re
from collections.abc import Sequence

import numpy as np
import torch

from megatron_grow.checkpoint import io, layout
from megatron_grow.checkpoint.manifest import build_manifest, read_checkpoint_info
from megatron_grow.config.loader import recipe_to_dict
from megatron_grow.config.schema import ModelConfig, Recipe
from megatron_grow.errors import CheckpointError
from megatron_grow.models.routing import unwrap

OPTIMIZER_FORMAT = "dp_reshardable"
_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")


def megatron_args(recipe: Recipe, model: ModelConfig, counters: dict, world_size: int) -> argparse.Namespace:
    """The subset of Megatron-LM's ``args`` that its checkpoint loading and tools read."""
    from megatron_grow.models.mcore_config import padded_vocab_size

    p, t = recipe.parallel, recipe.training
    return argparse.Namespace(
        num_layers=model.num_layers, hidden_size=model.hidden_size, ffn_hidden_size=model.moe_ffn_hidden_size,
        num_attention_heads=model.num_attention_heads, group_query_attention=True,
        num_query_groups=model.num_query_groups, kv_channels=model.kv_channels,
        num_experts=model.num_moe_experts, moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_router_score_function=model.moe_router_score_function,
        moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=model.moe_router_bias_update_rate,
        moe_router_load_balancing_type=model.moe_router_load_balancing_type,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff, moe_layer_freq=1,
        qk_layernorm=model.qk_layernorm, normalization=model.normalization, norm_epsilon=model.layernorm_epsilon,
        swiglu=model.gated_linear_unit, add_bias_linear=model.add_bias_linear,
        untie_embeddings_and_output_weights=model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type, rotary_base=model.rotary_base,
        rotary_percent=model.rotary_percent, seq_length=model.seq_length,
        max_position_embeddings=model.seq_length,
        padded_vocab_size=padded_vocab_size(model, p.tensor_model_parallel_size),
        make_vocab_size_divisible_by=model.make_vocab_size_divisible_by, init_method_std=model.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
        context_parallel_size=p.context_parallel_size, use_distributed_optimizer=p.use_distributed_optimizer,
        world_size=world_size, micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
        train_iters=t.train_iters, lr=t.lr, min_lr=t.min_lr, lr_decay_style=t.lr_decay_style,
        lr_warmup_iters=t.lr_warmup_iters, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, seed=t.seed, bf16=t.bf16,
        iteration=counters["iteration"], consumed_train_samples=counters["consumed_samples"],
        consumed_valid_samples=0, ckpt_format="torch_dist", use_dist_ckpt=True,
        dist_ckpt_optim_fully_reshardable=False,
    )


def rng_snapshot() -> dict:
    from megatron.core import tensor_parallel

    state = {"random": random.getstate(), "np": np.random.get_state(), "torch_cpu": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: dict | None):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def save_training_checkpoint(root: str, chunks: Sequence[torch.nn.Module], optimizer, scheduler, recipe: Recipe,
                             model: ModelConfig, counters: dict, lineage: list, layout_info: dict,
                             keep_last: int | None = None) -> str:
    models = [unwrap(c) for c in chunks]
    state = io.model_sharded_state_dict(models)
    model_sd = state["model"] if len(models) == 1 else state
    if recipe.checkpoint.save_optim and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, metadata={"distrib_optim_sharding_type": OPTIMIZER_FORMAT})
    manifest = io.broadcast_object(build_manifest(model=model, layout=layout_info, counters=counters,
                                                  lineage=lineage, recipe=recipe_to_dict(recipe)))
    state.update(
        opt_param_scheduler=scheduler.state_dict() if scheduler is not None else None,
        rng_state=_rng_sharded_object(rng_snapshot()),
        iteration=counters["iteration"],
        checkpoint_version=3.0,
        num_floating_point_operations_so_far=counters["flops_so_far"],
        args=megatron_args(recipe, model, counters, torch.distributed.get_world_size()),
        megatron_grow=manifest,
    )
    return io.save_checkpoint(root, counters["iteration"], state, manifest, keep_last=keep_last)


def has_checkpoint(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, layout.TRACKER_FILENAME))


def load_training_checkpoint(root: str, chunks: Sequence[torch.nn.Module], optimizer, scheduler,
                             load_optim: bool = True) -> tuple[dict, list, str, bool]:
    """Resume from the tracker under ``root``: weights, optimizer, scheduler, RNG.

    Returns (counters, lineage, checkpoint dir, whether scheduler state was found). A checkpoint
    written by ``megatron-grow grow`` has weights and counters only: the optimizer starts fresh
    (the paper's reset) and the caller starts a fresh schedule at its iteration.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir, it = layout.resolve_checkpoint_dir(root)
    info = read_checkpoint_info(ckpt_dir, it)
    models = [unwrap(c) for c in chunks]
    state = io.model_sharded_state_dict(models)
    md = io.read_storage_metadata(ckpt_dir)
    io.check_shard_files(ckpt_dir, md)
    io.check_against_checkpoint(state, ckpt_dir, md)  # names the first mismatching tensor
    stored = set(md.state_dict_metadata)
    model_sd = state["model"] if len(models) == 1 else state
    # Optimizer keys are "optimizer...." or, for a ChainedOptimizer (dense + expert), "chained_<i>.optimizer...."
    with_optim = load_optim and optimizer is not None and any(_OPTIMIZER_KEY.match(k) for k in stored)
    if load_optim and optimizer is not None and not with_optim and torch.distributed.get_rank() == 0:
        print(f"[train] {ckpt_dir} has no optimizer state: Adam moments start fresh", flush=True)
    if with_optim:
        allocate_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata={"distrib_optim_sharding_type": OPTIMIZER_FORMAT})
    same_world = info.layout.get("world_size") == torch.distributed.get_world_size()
    if same_world and "rng_state" in {k.split("/")[0] for k in stored} | _sharded_object_keys(ckpt_dir):
        state["rng_state"] = _rng_sharded_object(None)
    try:
        loaded = dist_checkpointing.load(state, ckpt_dir)
    except Exception as e:
        raise CheckpointError(f"resuming from {ckpt_dir} failed ({type(e).__name__}: {e})") from e
    if with_optim:
        with torch.no_grad():  # fp32 main params are views of parameters that require grad
            optimizer.load_state_dict(loaded["optimizer"])
        restore_adam_steps(optimizer)
    common = io.read_common_state(ckpt_dir)
    scheduler_loaded = bool(scheduler is not None and common.get("opt_param_scheduler"))
    if scheduler_loaded:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if "rng_state" in loaded and loaded["rng_state"] is not None:
        restore_rng(loaded["rng_state"])
    return dict(info.counters), list(info.lineage), ckpt_dir, scheduler_loaded


def allocate_adam_state(optimizer) -> None:
    """Give a fresh torch Adam/AdamW its state (step 0, zero moments) before a resume.

    Without TE/apex, MCore's distributed optimizer wraps ``torch.optim.AdamW``, whose state
    appears only at its first step; ``DistributedOptimizer.state_dict()`` then finds no
    ``step`` and the loading state dict cannot be built. The values are overwritten by the load.
    """
    inner_optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in inner_optimizers:
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.Adam | torch.optim.AdamW) or len(torch_opt.state) > 0:
            continue
        for group in torch_opt.param_groups:
            for p in group["params"]:
                torch_opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def restore_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step``, equal to the step MCore saved, after a load.

    Without TE/apex, MCore 0.16.1 keeps torch AdamW's per-parameter ``step`` in the optimizer's
    ``param_groups`` (one value) and, on load, writes *one shared* tensor into every parameter's
    state, which the dp_reshardable state copy then overwrites with 0. Torch increments
    ``step`` in place per parameter, so either way Adam's bias correction would be wrong after a
    resume (found by the bitwise-resume test). The saved value in ``param_groups`` is right.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.Optimizer):
            continue
        for group in torch_opt.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                state = torch_opt.state.get(p)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _sharded_object_keys(ckpt_dir: str) -> set:
    """ShardedObjects are stored as files named ``<key>/shard_*`` next to the torch_dist shards."""
    return {name for name in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, name))}
