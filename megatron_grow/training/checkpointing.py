"""Training checkpoints in the Megatron-LM layout, readable by Megatron-LM.

One checkpoint (``iter_NNNNNNN/``, torch_dist) holds:

================================  ==========================================================
entry                             contents
================================  ==========================================================
``model`` (``model0``.. w/ VPP)   sharded model weights (MCore storage keys)
``optimizer``                     MCore distributed/FP32 optimizer in model space
                                  (``fully_reshardable``): ``optimizer.state.<state>.<key>``
``opt_param_scheduler``           MCore scheduler state
``rng_state``                     per-rank RNG (CPU, CUDA, MCore tracker), ShardedObject
``iteration``, ``checkpoint_version``, ``num_floating_point_operations_so_far``  as Megatron-LM
``args``                          an ``argparse.Namespace`` with Megatron-LM argument names
                                  (``checkpoint.megatron_args``)
``megatron_grow``                 our manifest: recipe, counters, lineage (also megatron_grow.json)
================================  ==========================================================

Saves go through ``checkpoint.io.save_checkpoint`` (atomic: staging dir, fsync, rename,
tracker last; keep the newest N). The optimizer state is stored in *model space*: for every
parameter, its fp32 main copy (``param``), ``exp_avg`` and ``exp_avg_sq`` with the parameter's
global shape and storage key, plus the step and hyper-parameters in the common state. Any
TP/PP/EP/DP layout reads its own slices (and growth reads them through its index maps,
``growth.optimizer_state``). Checkpoints written before in ``dp_reshardable`` (tied to the
TP/PP/EP layout) still load at their own layout.

Megatron-Core 0.16.1 needs four fixes on this path, all here:

* ``allocate_adam_state``: torch AdamW (no TE/apex) has no ``step`` before its first step, so
  the loading state dict cannot be built (tests/distributed/test_training.py resume tests);
* ``restore_adam_steps``: the load writes one shared, then zeroed, ``step`` into every
  parameter's state (same tests);
* ``load_optimizer_state``: ``KeyError: 'step'`` when the model-space tensors are copied into
  torch AdamW's per-parameter state (every resume test), and the common part is shaped by the
  saving layout's expert parallelism (``KeyError: 'optimizer'`` at another EP;
  tests/distributed/test_optimizer_state.py, EP=2 -> PP=2 resume and carry tests);
* ``checkpoint.io.check_against_checkpoint`` must not apply the caller's factories in place:
  the model-space format finds each parameter's ShardedTensor by the parameter object
  (``test_shape_check_leaves_the_callers_factories_unapplied``).
"""

from __future__ import annotations

import copy
import os
import random
import re
from collections.abc import Sequence

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge
from megatron.core.dist_checkpointing.mapping import ShardedObject, apply_factory_merges
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
from megatron.core.dist_checkpointing.utils import extract_sharded_base
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from megatron_grow.checkpoint import io, keys, paths
from megatron_grow.checkpoint.integrity import damaged_checkpoint_error, describe_non_finite, non_finite_counts
from megatron_grow.checkpoint.manifest import build_manifest, read_checkpoint_info
from megatron_grow.checkpoint.megatron_args import megatron_args, megatron_common_state
from megatron_grow.config.loader import recipe_to_dict
from megatron_grow.config.schema import ModelConfig, Recipe
from megatron_grow.errors import CheckpointError
from megatron_grow.models.routing import unwrap
from megatron_grow.models.specs import built_with_te

OPTIMIZER_FORMAT = "fully_reshardable"     # model space: what we save
LAYOUT_BOUND_FORMAT = "dp_reshardable"     # what earlier checkpoints hold; loads at their own TP/PP/EP
_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")


def optimizer_metadata(sharding_type: str = OPTIMIZER_FORMAT) -> dict:
    """``sharded_state_dict`` metadata. Without the chained prefix, the dense and the expert
    optimizer's states are stored under the parameters' own keys (no ``chained_<i>.``)."""
    return {"distrib_optim_sharding_type": sharding_type, "chained_optim_avoid_prefix": True}


def stored_optimizer_format(stored_keys) -> str | None:
    """Which optimizer format a checkpoint holds, from its tensor keys (None: no optimizer state)."""
    if any(keys.is_model_space_optimizer_key(k) for k in stored_keys):
        return OPTIMIZER_FORMAT
    if any(_OPTIMIZER_KEY.match(k) for k in stored_keys):
        return LAYOUT_BOUND_FORMAT
    return None


def rng_snapshot() -> dict:
    state = {"random": random.getstate(), "np": np.random.get_state(), "torch_cpu": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: dict | None):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def save_training_checkpoint(root: str, chunks: Sequence[torch.nn.Module], optimizer, scheduler, recipe: Recipe,
                             model: ModelConfig, counters: dict, lineage: list, layout_info: dict,
                             keep_last: int | None = None) -> str:
    models = [unwrap(c) for c in chunks]
    state = io.model_sharded_state_dict(models)
    model_sd = state["model"] if len(models) == 1 else state
    if recipe.checkpoint.save_optim and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=optimizer_metadata())
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
    return bool(root) and os.path.isfile(os.path.join(root, paths.TRACKER_FILENAME))


def load_training_checkpoint(root: str, chunks: Sequence[torch.nn.Module], optimizer, scheduler,
                             load_optim: bool = True, expert_backend: str = "sequential",
                             ) -> tuple[dict, list, str, bool]:
    """Resume from the tracker under ``root``: weights, optimizer, scheduler, RNG.

    Returns (counters, lineage, checkpoint dir, whether scheduler state was found). A checkpoint
    written by ``megatron-grow grow`` has weights and counters only: the optimizer starts fresh
    (the paper's reset) and the caller starts a fresh schedule at its iteration.
    """
    ckpt_dir, it = paths.resolve_checkpoint_dir(root)
    info = read_checkpoint_info(ckpt_dir, it)
    models = [unwrap(c) for c in chunks]
    state = io.model_sharded_state_dict(models)
    md = io.read_storage_metadata(ckpt_dir)
    # A checkpoint stored under the other layer spec's names (e.g. grown with --target-spec te).
    built = keys.built_spec(built_with_te(models))  # the local spec for grouped_mm even with TE installed
    keys.rename_for_spec(state, built, keys.storage_spec(md.state_dict_metadata) or built)
    io.check_shard_files(ckpt_dir, md)
    io.check_against_checkpoint(state, ckpt_dir, md)  # names the first mismatching tensor
    stored = set(md.state_dict_metadata)
    model_sd = state["model"] if len(models) == 1 else state
    optim_format = stored_optimizer_format(stored)
    with_optim = load_optim and optimizer is not None and optim_format is not None
    # Weights are stored per expert whatever the backend, but the optimizer's parameters are the
    # backend's own tensors (per expert, or stacked for grouped_mm), so moments do not cross backends.
    written_with = info.model.moe_expert_backend if info.model is not None else "sequential"
    if with_optim and written_with != expert_backend:
        with_optim = False
        if torch.distributed.get_rank() == 0:
            print(f"[train] {ckpt_dir} was written with model.moe_expert_backend={written_with}, this run uses "
                  f"{expert_backend}: weights load, Adam moments start fresh", flush=True)
    if load_optim and optimizer is not None and optim_format is None and torch.distributed.get_rank() == 0:
        print(f"[train] {ckpt_dir} has no optimizer state: Adam moments start fresh", flush=True)
    if with_optim:
        state["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd, optim_format)
    same_world = info.layout.get("world_size") == torch.distributed.get_world_size()
    if same_world and "rng_state" in {k.split("/")[0] for k in stored} | _sharded_object_keys(ckpt_dir):
        state["rng_state"] = _rng_sharded_object(None)
    common = io.read_common_state(ckpt_dir)  # first: a damaged common.pt is named (the load reads it too)
    try:
        loaded = dist_checkpointing.load(state, ckpt_dir)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        # Rank 0 prints the error: only it re-reads the checkpoint to find the damaged item.
        raise damaged_checkpoint_error(ckpt_dir, md, e, "resuming from",
                                       scan=torch.distributed.get_rank() == 0) from None
    check_finite_weights(models, ckpt_dir)
    if with_optim:
        load_optimizer_state(optimizer, loaded["optimizer"])
    scheduler_loaded = bool(scheduler is not None and common.get("opt_param_scheduler"))
    if scheduler_loaded:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if "rng_state" in loaded and loaded["rng_state"] is not None:
        restore_rng(loaded["rng_state"])
    return dict(info.counters), list(info.lineage), ckpt_dir, scheduler_loaded


def check_finite_weights(models: Sequence[torch.nn.Module], ckpt_dir: str) -> None:
    """A checkpoint with NaN or ±inf weights is refused on load, naming the tensor (collective: every
    rank raises the same error). Training from it would stop at its first step and call it "the
    last good checkpoint"."""
    found = None
    for model in models:
        for name, param in model.named_parameters():
            nan, inf = non_finite_counts(param.data)
            if nan or inf:
                found = f"{name} ({describe_non_finite(nan, inf)} of {param.numel()})"
                break
        if found:
            break
    every = [found]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, found)
    bad = [f for f in every if f]
    if bad:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds non-finite weights: {bad[0]}; it cannot be trained "
                              "from (resume from an earlier checkpoint)")


def optimizer_sharded_state_dict(optimizer, model_sd: dict, sharding_type: str = OPTIMIZER_FORMAT):
    """The optimizer's loading state dict (``is_loading``) in ``sharding_type``, after giving a fresh
    torch AdamW its state (see ``allocate_adam_state``)."""
    allocate_adam_state(optimizer)
    return optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=optimizer_metadata(sharding_type))


def load_optimizer_in_memory(optimizer, chunks: Sequence[torch.nn.Module], fill_tensors, common: dict) -> None:
    """Load ``optimizer`` from tensors made in memory instead of read from disk (online growth with
    ``growth.optimizer: carry``), through the same model-space state dict a resume uses.

    ``fill_tensors(sharded_tensors)`` fills this rank's ``optimizer.state.<state>.<key>``
    ShardedTensors (factories applied); ``common`` is the non-tensor part a checkpoint would
    hold (param_groups with Adam's step). Mirrors ``dist_checkpointing.load``: factories
    applied, tensors filled, merged with the common part, factory merges applied.
    """
    models = [unwrap(c) for c in chunks]
    state = io.model_sharded_state_dict(models)
    model_sd = state["model"] if len(models) == 1 else state
    request = {"optimizer": optimizer_sharded_state_dict(optimizer, model_sd)}
    request, nonpersistent, factories = load_preprocess(request)
    sharded, _ = extract_sharded_base(request)
    fill_tensors(list(io.iter_sharded_tensors(sharded)))
    dict_list_map_inplace(lambda st: st.data, sharded)
    loaded = {"optimizer": copy.deepcopy(common)}
    merge(loaded, nonpersistent)
    merge(loaded, sharded)
    loaded = apply_factory_merges(loaded, factories)
    load_optimizer_state(optimizer, loaded["optimizer"])


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def load_optimizer_state(optimizer, loaded) -> None:
    """Put a loaded optimizer state dict (from ``optimizer_sharded_state_dict``) into ``optimizer``.

    Two Megatron-Core 0.16.1 problems with the model-space format are handled here:

    * the common part is shaped by the *saving* layout: one optimizer ``{optimizer,
      param_state_sharding_type}`` where no parameter is expert-parallel (EP=1), a chained
      ``{0: dense, 1: expert}`` otherwise, with ``is_expert_parallel`` in the groups' identity.
      Loading at another EP fails (``KeyError: 'optimizer'``, then no matching group). The
      saved groups are pooled and each of this layout's groups takes the saved group with the
      same identity, or the same one but for ``is_expert_parallel`` (hyper-parameters and step
      are per group kind, not per layout);
    * ``DistributedOptimizer.load_state_dict`` copies the model-space tensors into every entry
      of the inner optimizer's per-parameter state; torch AdamW (no TE/apex) keeps a ``step``
      there that the format does not store (it is in ``param_groups``), and the copy fails with
      ``KeyError: 'step'``. The param state is loaded in a second call with ``step`` set aside,
      then every parameter gets the saved step (``restore_adam_steps``).
    """
    inner = _inner_optimizers(optimizer)
    saved_groups = _saved_param_groups(loaded)
    with torch.no_grad():  # fp32 main params are views of parameters that require grad
        for i, opt in enumerate(inner):
            own = loaded if len(inner) == 1 else loaded.get(i, {})
            part = dict(own) if isinstance(own, dict) else {}
            if not (isinstance(opt, DistributedOptimizer) and part.get("param_state") is not None
                    and _sharding_type(loaded) == OPTIMIZER_FORMAT):
                opt.load_state_dict(own)
                continue
            part["optimizer"] = {"param_groups": [_matching_group(g, saved_groups) for g in opt.optimizer.param_groups]}
            opt.load_state_dict({"optimizer": part["optimizer"]})  # hyper-parameters, step, state allocation
            torch_state = opt.optimizer.state
            steps = {p: s.pop("step") for p, s in torch_state.items() if "step" in s}
            try:
                opt.load_parameter_state_from_fully_reshardable(part["param_state"])
            finally:
                for p, step in steps.items():
                    torch_state[p]["step"] = step
        if hasattr(optimizer, "_synchronize_steps") and len(inner) > 1:
            optimizer._synchronize_steps()
    restore_adam_steps(optimizer)


_GROUP_IDENTITY = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _common_parts(loaded) -> list:
    """The per-optimizer common dicts of a loaded state, whichever layout saved it."""
    if not isinstance(loaded, dict):
        return []
    parts = [loaded] if "optimizer" in loaded else []
    return parts + [v for k, v in loaded.items() if isinstance(k, int) and isinstance(v, dict) and "optimizer" in v]


def _saved_param_groups(loaded) -> list:
    return [g for part in _common_parts(loaded) for g in part["optimizer"].get("param_groups", [])]


def _sharding_type(loaded) -> str | None:
    kinds = {part.get("param_state_sharding_type") for part in _common_parts(loaded)}
    return kinds.pop() if len(kinds) == 1 else None


def _matching_group(group: dict, saved: list) -> dict:
    """The saved group for this layout's ``group``: same identity, else the same but for
    ``is_expert_parallel``; returned with this group's identity so that MCore matches it."""
    ident = {k: group.get(k) for k in _GROUP_IDENTITY}
    loose = [k for k in _GROUP_IDENTITY if k != "is_expert_parallel"]
    for keys_to_match in (_GROUP_IDENTITY, loose):
        for g in saved:
            if all(g.get(k) == ident[k] for k in keys_to_match):
                return {**{k: v for k, v in g.items() if k != "params"}, **ident}
    raise CheckpointError(f"the checkpoint has no optimizer state for parameter group {ident}")


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
