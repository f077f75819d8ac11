"""Optimizer carry: grow Adam's state through the same index maps as the weights.

``growth.optimizer``:

* ``reset`` (the paper; the default): the grown model starts with fresh Adam moments.
* ``carry``: every optimizer-state tensor of the grown model is read from the source's
  model-space optimizer state (``optimizer.state.<state>.<storage key>``, see
  ``checkpoint.keys``) through exactly the requests the weights use
  (``retarget.build_tasks``): a depth copy reads its source layer's moments, an expert copy
  its source expert's, a copied router row its source row's. ``exp_avg`` and ``exp_avg_sq``
  are copied (no noise); ``param`` (the fp32 main copy) grows exactly like the weight itself
  (same noise, same identity-init zeroing). Adam's step and hyper-parameters (the
  ``param_groups`` in the common state) are kept.
* ``carry_zero_new``: as ``carry``, but entries that did not exist in the source (new depth
  copies, expert copies, copied router rows) start with zero moments (MSG's choice).
* ``policy``: as ``carry``, then each moment of each entry by ``growth.optimizer_policy``: its
  kind (``param_kind``) and whether it is a copy choose a rule (copy, scale, interpolate, reset)
  for ``exp_avg`` and ``exp_avg_sq`` independently (Expert Upcycling; SPARKLING's asymmetric reset).

The router's ``expert_bias`` is a buffer updated by the aux-loss-free balancing, not by
Adam: it has no optimizer state (it grows with the weights).

This module holds only the optimizer-specific glue: which tensors, how moments grow, the
checks. The requests, the region reads and the noise are the weights' (``retarget``,
``grow``, ``noise``). Loading grown tensors into a live optimizer is the trainer's
(``training.checkpointing.load_optimizer_in_memory``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence

import torch
from megatron.core import dist_checkpointing

from megatron_grow.checkpoint import io, keys
from megatron_grow.config.schema import GrowthConfig, MomentRule, OptimizerCarry, OptimizerPolicyConfig, ParamKind
from megatron_grow.errors import GrowthError
from megatron_grow.growth import retarget, source_reads
from megatron_grow.growth.operators import operator_class
from megatron_grow.growth.plan import GrowthPlan
from megatron_grow.growth.source import GrowthSource
from megatron_grow.parallel.collectives import print_rank0

CARRY_MODES = (OptimizerCarry.CARRY, OptimizerCarry.CARRY_ZERO_NEW, OptimizerCarry.POLICY)
OPTIMIZER_STATES = (keys.MAIN_PARAM_STATE,) + keys.ADAM_MOMENTS


def carries(growth: GrowthConfig) -> bool:
    """Whether ``growth.optimizer`` carries Adam state (``carry`` or ``carry_zero_new``).

    Args:
        growth: the recipe's growth section.

    Returns:
        True for a carry.
    """
    return growth.optimizer in CARRY_MODES


def check_carry_recipe(growth: GrowthConfig) -> None:
    """Refuse a carry an operator cannot do, e.g. width's random new experts (before anything is read).

    Args:
        growth: the recipe's growth section.

    Raises:
        GrowthError: the first operator's reason.
    """
    if not carries(growth):
        return
    for name, section in growth.sections().items():
        problem = operator_class(name)(section).carry_problem(growth.optimizer)
        if problem:
            raise GrowthError(problem)


def check_carry_source(growth: GrowthConfig, ckpt_dir: str, storage) -> None:
    """Refuse carry from a checkpoint without model-space optimizer state (metadata only).

    Args:
        growth: the recipe's growth section.
        ckpt_dir: SRC's iteration directory (for the message).
        storage: SRC's torch DCP metadata.

    Raises:
        GrowthError: carry asked and SRC has no model-space optimizer state.
    """
    if not carries(growth):
        return
    if not any(keys.is_model_space_optimizer_key(k) for k in storage.state_dict_metadata):
        raise GrowthError(f"growth.optimizer: {growth.optimizer} needs the source's optimizer state in model space, "
                          f"and {ckpt_dir} has none (saved without optimizer state, by `megatron-grow grow` with "
                          "optimizer: reset, or in the layout-bound dp_reshardable format of earlier versions); "
                          "use growth.optimizer: reset, or resume the source once and save it again")


def split_key(key: str) -> tuple[str, str] | None:
    """``optimizer.state.<state>.<model key>`` -> (state, model key).

    Args:
        key: a storage key.

    Returns:
        The pair, or None for other keys.
    """
    for state in OPTIMIZER_STATES:
        prefix = keys.optimizer_state_key(state, "")
        if key.startswith(prefix):
            return state, key[len(prefix):]
    return None


def optimizer_tensors_for(model_tensors: Iterable, stored_keys: set) -> list:
    """Fresh fp32 optimizer-state ShardedTensors (this rank's slices) for the target model's tensors
    that have optimizer state in the source (parameters; buffers such as expert_bias have none).

    Args:
        model_tensors: the grown model's sharded tensors (this rank's).
        stored_keys: SRC's storage keys.

    Returns:
        One ShardedTensor per (tensor, optimizer state) SRC stores.
    """
    out = []
    for st in model_tensors:
        for state in OPTIMIZER_STATES:
            key = keys.optimizer_state_key(state, st.key)
            if key in stored_keys:
                out.append(dataclasses.replace(st, key=key, dtype=torch.float32,
                                               data=torch.empty(st.local_shape, dtype=torch.float32)))
    return out


def param_kind(model_key: str) -> str | None:
    """The ``ParamKind`` of a parameter's storage key, or None for a tensor of no named kind.

    Args:
        model_key: a model storage key (``decoder.layers.self_attention.linear_proj.weight``).

    Returns:
        The kind's value.
    """
    if "norm" in model_key.rsplit(".", 1)[-1] or "layernorm" in model_key:
        return ParamKind.NORMS.value   # linear_qkv.layer_norm_weight, q/k_layernorm, final_layernorm
    for marker, kind in ((".router.", ParamKind.ROUTER), (".experts.", ParamKind.EXPERTS),
                         (".shared_experts.", ParamKind.EXPERTS), ("self_attention.", ParamKind.ATTENTION),
                         ("embedding.", ParamKind.EMBEDDINGS), ("output_layer.", ParamKind.EMBEDDINGS)):
        if marker in model_key:
            return kind.value
    return None


def copy_mask(task: retarget.SliceTask, source: torch.Tensor, plan: GrowthPlan) -> torch.Tensor:
    """Which entries of a grown slice are copies (new in the grown model), broadcastable to it.

    Args:
        task: the slice's growth task.
        source: the loaded source slice (router: the source layer's whole ``[E_src, H]``).
        plan: the growth plan.

    Returns:
        A bool tensor: the whole slice for a new layer or an expert copy, per row for the router.
    """
    new_layer = task.target_layer is not None and plan.layer_is_new_copy[task.target_layer]
    if task.kind in (retarget.ROUTER, retarget.EXPERT_BIAS):
        rows = torch.tensor([new_layer or c > 0 for c in plan.expert_copy_index[task.target_layer]])
        return rows.view(-1, *([1] * (source.dim() - 1)))
    is_new = new_layer or (task.kind == retarget.EXPERT
                           and plan.expert_copy_index[task.target_layer][task.target_expert] > 0)
    return torch.tensor(is_new)


def apply_moment_rule(carried: torch.Tensor, rule: str, factor: float, toward: float) -> torch.Tensor:
    """One moment rule (docs/growth.md, "Optimizer state by policy") on the carried value.

    Args:
        carried: the moment read through the weights' index maps (fp32).
        rule: a ``MomentRule`` value.
        factor: scale's factor; interpolate's weight of the carried value.
        toward: the value interpolate moves towards.

    Returns:
        A new tensor.
    """
    if rule == MomentRule.COPY:
        return carried.clone()
    if rule == MomentRule.SCALE:
        return carried * factor
    if rule == MomentRule.INTERPOLATE:
        return carried * factor + (1.0 - factor) * toward
    return torch.zeros_like(carried)


def grown_moment(task: retarget.SliceTask, source: torch.Tensor, plan: GrowthPlan, zero_new: bool,
                 moment: str = keys.ADAM_MOMENTS[0]) -> torch.Tensor:
    """An Adam moment slice of the grown model from its source slice: the weights' index maps, no noise.

    Args:
        task: the slice's growth task (``retarget.build_tasks``).
        source: the loaded source slice.
        plan: the growth plan.
        zero_new: entries new in the grown model (a whole depth copy, an expert copy, a copied
            router row: the composed maps' copies) get 0.
        moment: ``exp_avg`` or ``exp_avg_sq`` (which rule of ``growth.optimizer_policy`` applies).

    Returns:
        The grown slice.
    """
    carried = source
    if task.kind in (retarget.ROUTER, retarget.EXPERT_BIAS):
        carried = source.index_select(0, torch.tensor(plan.expert_source[task.target_layer], dtype=torch.long))
    policy = plan.growth.optimizer_policy
    if policy is None:
        if not zero_new:
            return carried
        return torch.where(copy_mask(task, source, plan), torch.zeros_like(carried), carried)
    return _by_policy(task, carried, copy_mask(task, source, plan), policy, moment)


def _by_policy(task: retarget.SliceTask, carried: torch.Tensor, is_copy: torch.Tensor,
               policy: OptimizerPolicyConfig, moment: str) -> torch.Tensor:
    kind = param_kind(task.target.key)
    as_copy = apply_moment_rule(carried, *policy.policy_for(kind, True).rule(moment))
    as_original = apply_moment_rule(carried, *policy.policy_for(kind, False).rule(moment))
    return torch.where(is_copy, as_copy, as_original)


def _tasks_for(targets: Sequence, plan: GrowthPlan) -> tuple[list, dict, dict]:
    """Growth tasks for optimizer-state tensors: built on model-keyed views of them (so the weights'
    classification, index maps and noise apply), then the source requests are re-keyed to the
    source's optimizer state. Returns (tasks, requests, state of each request id)."""
    tasks, requests, state_of = [], {}, {}
    for state in OPTIMIZER_STATES:
        mine = [t for t in targets if split_key(t.key)[0] == state]
        views = [dataclasses.replace(t, key=split_key(t.key)[1]) for t in mine]  # same data buffer
        state_tasks, state_requests = retarget.build_tasks(views, plan)
        for rid, req in state_requests.items():
            req.key = keys.optimizer_state_key(state, req.key)
            requests[(state,) + rid] = req
            state_of[(state,) + rid] = state
        for t in state_tasks:
            t.request_id = (state,) + t.request_id
        tasks.extend(state_tasks)
    return tasks, requests, state_of


@torch.no_grad()
def fill_grown_optimizer_tensors(targets: Sequence, source: GrowthSource, progress: bool = True) -> None:
    """Fill the grown model's optimizer-state tensors from the source checkpoint (collective).

    Args:
        targets: this rank's optimizer-state ShardedTensors, keyed ``optimizer.state.<state>.<storage key>``.
        source: the prepared growth.
        progress: log one line when done.
    """
    plan = source.plan
    zero_new = plan.growth.optimizer == OptimizerCarry.CARRY_ZERO_NEW
    tasks, requests, state_of = _tasks_for(targets, plan)
    weight_tasks = [t for t in tasks if state_of[t.request_id] == keys.MAIN_PARAM_STATE]
    # The main copy grows like the weight: the noise scale comes from the source *weights*.
    expert_std = source_reads.expert_stds(weight_tasks, plan, source.reader)
    order, groups = source_reads.layer_groups(tasks)
    for name in order:  # reads are this rank's alone: no rounds to keep in step with other ranks
        group_tasks = groups[name]
        group_requests = {t.request_id: requests[t.request_id] for t in group_tasks}
        source_reads.read_requests(group_requests, source.reader)
        for t in group_tasks:
            loaded = requests[t.request_id].data
            if state_of[t.request_id] == keys.MAIN_PARAM_STATE:
                value = retarget.grown_slice(t, loaded, plan, expert_std)
            else:
                value = grown_moment(t, loaded, plan, zero_new, state_of[t.request_id])
            t.target.data.copy_(value.to(t.target.data.dtype))
        for st in group_requests.values():
            st.data = torch.empty(0, dtype=st.data.dtype)
    if progress:
        print_rank0(f"optimizer state ({plan.growth.optimizer}): {len(tasks)} tensors grown from the source's "
                    "model-space Adam state", prefix="[grow] ")


def carried_common_state(ckpt_dir: str) -> dict:
    """The source's non-tensor optimizer state (param_groups with Adam's step and hyper-parameters,
    the sharding type), without the per-parameter part (which the grown tensors replace).

    Args:
        ckpt_dir: SRC's iteration directory.

    Returns:
        The common optimizer state.

    Raises:
        GrowthError: SRC has optimizer tensors but no common optimizer state.
    """
    common = dist_checkpointing.load_common_state_dict(ckpt_dir).get("optimizer")
    if common is None:
        raise GrowthError(f"{ckpt_dir} has optimizer tensors but no optimizer common state (param_groups)")
    common = copy.deepcopy(common)
    parts = [common] if "param_state_sharding_type" in common or "optimizer" in common else list(common.values())
    for part in parts:
        part.pop("param_state", None)
    return common


def grown_optimizer_checkpoint_state(model_tensors: Sequence, source: GrowthSource,
                                     progress: bool = True) -> dict:
    """Entries for the grown checkpoint (offline growth): the grown model-space optimizer tensors
    and the source's common optimizer state, as a training checkpoint stores them.

    Args:
        model_tensors: the grown model's sharded tensors (this rank's).
        source: the prepared growth.
        progress: log one line when done.

    Returns:
        ``{"optimizer": common state, "optimizer_model_space": {index: ShardedTensor}}``.
    """
    storage = {k for k in io.read_storage_metadata(source.ckpt_dir).state_dict_metadata}
    targets = optimizer_tensors_for(model_tensors, storage)
    fill_grown_optimizer_tensors(targets, source, progress)
    return {"optimizer": carried_common_state(source.ckpt_dir),
            "optimizer_model_space": {str(i): st for i, st in enumerate(targets)}}
