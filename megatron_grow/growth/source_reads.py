"""Reading a source checkpoint for growth: collective loads, the noise statistics, read groups.

Shared by the weights (``growth.grow``) and the optimizer state (``growth.optimizer_state``):
both turn their target sharded tensors into read requests (``growth.retarget``) and read them
here, one source layer at a time, every rank taking part in every collective load.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import apply_factories

from megatron_grow.checkpoint import io
from megatron_grow.growth import noise, retarget
from megatron_grow.growth.plan import GrowthPlan
from megatron_grow.parallel.collectives import all_reduce_host, rank, world_size


def target_sharded_tensors(model_chunks: Sequence[torch.nn.Module]) -> list:
    sd = io.model_sharded_state_dict(model_chunks)
    apply_factories(sd)
    return list(io.iter_sharded_tensors(sd))


def collective_load(requests: dict, ckpt_dir: str, whole_tensors: dict | None = None) -> None:
    """One dist_checkpointing load of this rank's requests (possibly none); every rank calls it.

    With a single rank, MCore's torch_dist loader cannot read part of a tensor (torch's
    ShardedTensor needs the shard grid to cover the tensor, and MCore places the cells it was
    not asked for on rank ``(rank + 1) % world_size``, i.e. this rank). So one rank reads each
    source tensor whole, once (cached in ``whole_tensors``), and slices it: a 1-rank growth
    holds the source tensors it reads beside the grown model.
    """
    if world_size() == 1:
        cache = whole_tensors if whole_tensors is not None else {}
        missing = {st.key: st for st in requests.values() if st.key not in cache}
        if missing:
            whole = {key: whole_request(st) for key, st in missing.items()}
            cache.update(dist_checkpointing.load(whole, ckpt_dir, validate_access_integrity=False))
        for st in requests.values():
            region = tuple(slice(o, o + n) for o, n in
                           zip(st.global_offset, (1,) * st.prepend_axis_num + tuple(st.local_shape)))
            st.data = cache[st.key][region].reshape(st.local_shape).clone()
        return
    sd = {f"r{i}": st for i, st in enumerate(requests.values())}
    # Several ranks (and target layers) read the same source region: integrity checks are for resumes.
    loaded = dist_checkpointing.load(sd, ckpt_dir, validate_access_integrity=False)
    for i, st in enumerate(requests.values()):
        st.data = loaded[f"r{i}"]  # the request buffers are ours: adopt whatever tensor the load returned


def whole_request(st):
    """A request for the whole stored tensor ``st.key`` (prepended axes become real dims)."""
    shape = tuple(st.global_shape)
    return dataclasses.replace(st, data=torch.empty(shape, dtype=st.dtype), local_shape=shape,
                               global_offset=(0,) * len(shape), axis_fragmentations=(1,) * len(shape),
                               prepend_axis_num=0, replica_id=0, flattened_range=None)


def expert_stds(tasks: list, plan: GrowthPlan, ckpt_dir: str) -> dict:
    """Per (logical key, source layer, source expert) noise stds, from the full source expert tensors.

    Each full per-expert tensor is read by exactly one rank (round robin); moments are
    summed across ranks (exact: every entry is non-zero on one rank only) and combined in
    expert order, so every rank derives the same stds whatever the layout.
    """
    if not retarget.needs_expert_stats(plan):
        return {}
    L, E = plan.source.num_layers, plan.source.num_moe_experts
    templates: dict[str, Any] = {}
    for t in tasks:
        if t.kind == retarget.EXPERT and t.logical_key is not None:
            templates.setdefault(t.logical_key, t.target)
    keys = sorted(templates)
    # Every rank must agree on the key list (all ranks hold expert layers, since every layer is MoE).
    moments = torch.zeros(len(keys), L, E, 3, dtype=torch.float64)
    whole: dict = {}
    units = [(k, ls, es) for k in range(len(keys)) for ls in range(L) for es in range(E)]
    mine = units[rank()::world_size()]
    world_rounds = math.ceil(len(units) / world_size())
    per_round = max(1, E)  # read about one layer of experts per collective round
    for start in range(0, world_rounds, per_round):
        batch = mine[start:start + per_round]
        requests = {}
        for k, ls, es in batch:
            st = templates[keys[k]]
            full = tuple(st.global_shape[2:])
            requests[(k, ls, es)] = retarget._request(st, (ls, es) + (0,) * len(full), (L, E) + full, full)
        collective_load(requests, ckpt_dir, whole)
        for (k, ls, es), st in requests.items():
            moments[k, ls, es] = torch.tensor(noise.tensor_moments(st.data), dtype=torch.float64)
    if torch.distributed.is_initialized():
        all_reduce_host(moments)
    out = {}
    for k, key in enumerate(keys):
        for ls in range(L):
            per_expert = [noise.Moments(int(n), float(mu), float(m2)) for n, mu, m2 in moments[k, ls].tolist()]
            for es in range(E):
                out[(key, ls, es)] = noise.expert_noise_std(plan, per_expert, es)
    return out


def group_of(task) -> Any:
    # By *source* layer: all copies of a layer share its requests, which are freed after the group.
    return ("layer", task.source_layer) if task.source_layer is not None else ("other", 0)


def layer_groups(tasks: list) -> tuple[list, dict]:
    """Tasks grouped by the source layer they read, in reading order (non-layer tensors first)."""
    groups: dict[Any, list] = {}
    for t in tasks:
        groups.setdefault(group_of(t), []).append(t)
    return sorted(groups, key=lambda g: (g[0] != "other", g[1])), groups


def collective_rounds(local_rounds: int) -> int:
    """Every rank takes part in as many loads as the rank with the most groups (PP stages differ)."""
    if not torch.distributed.is_initialized():
        return local_rounds
    n = torch.tensor([local_rounds], dtype=torch.long)
    all_reduce_host(n, op=torch.distributed.ReduceOp.MAX)
    return int(n.item())
