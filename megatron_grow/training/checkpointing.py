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
                                  (``checkpoint.megatron_args``)
``megatron_grow``                 our manifest: recipe, counters, lineage (also megatron_grow.json)
================================  ==========================================================

Saves go through ``checkpoint.io.save_checkpoint`` (atomic: staging dir, fsync, rename,
tracker last; keep the newest N). The optimizer's ``dp_reshardable`` format resumes at the
same TP/PP/EP layout with any DP size; the model weights load at any layout.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence

import numpy as np
import torch

from megatron_grow.checkpoint import io, keys, layout
from megatron_grow.checkpoint.manifest import build_manifest, read_checkpoint_info
from megatron_grow.checkpoint.megatron_args import megatron_args, megatron_common_state
from megatron_grow.config.loader import recipe_to_dict
from megatron_grow.config.schema import ModelConfig, Recipe
from megatron_grow.errors import CheckpointError
from megatron_grow.models.routing import unwrap
from megatron_grow.models.specs import te_available

OPTIMIZER_FORMAT = "dp_reshardable"
_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")


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
    args = megatron_args(model, recipe.parallel, counters=counters, world_size=torch.distributed.get_world_size(),
                         training=recipe.training, optimizer_saved="optimizer" in state)
    state.update(megatron_common_state(args, counters))
    state.update(
        opt_param_scheduler=scheduler.state_dict() if scheduler is not None else None,
        rng_state=_rng_sharded_object(rng_snapshot()),
        megatron_grow=manifest,
    )
    return io.save_checkpoint(root, counters["iteration"], state, manifest, keep_last=keep_last)


def has_checkpoint(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, layout.TRACKER_FILENAME))


def load_training_checkpoint(root: str, chunks: Sequence[torch.nn.Module], optimizer, scheduler,
                             load_optim: bool = True, expert_backend: str = "sequential",
                             ) -> tuple[dict, list, str, bool]:
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
    # A checkpoint stored under the other layer spec's names (e.g. grown with --target-spec te).
    keys.rename_for_spec(state, keys.built_spec(te_available()),
                         keys.storage_spec(md.state_dict_metadata) or keys.built_spec(te_available()))
    io.check_shard_files(ckpt_dir, md)
    io.check_against_checkpoint(state, ckpt_dir, md)  # names the first mismatching tensor
    stored = set(md.state_dict_metadata)
    model_sd = state["model"] if len(models) == 1 else state
    # Optimizer keys are "optimizer...." or, for a ChainedOptimizer (dense + expert), "chained_<i>.optimizer...."
    with_optim = load_optim and optimizer is not None and any(_OPTIMIZER_KEY.match(k) for k in stored)
    # Weights are stored per expert whatever the backend, but the distributed optimizer's flat
    # buffers follow the parameter order in memory, which differs between expert backends.
    written_with = info.model.moe_expert_backend if info.model is not None else "sequential"
    if with_optim and written_with != expert_backend:
        with_optim = False
        if torch.distributed.get_rank() == 0:
            print(f"[train] {ckpt_dir} was written with model.moe_expert_backend={written_with}, this run uses "
                  f"{expert_backend}: weights load, Adam moments start fresh (their flat layout differs)", flush=True)
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
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
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
