"""Reading a source checkpoint for growth: region reads, the noise statistics, read groups.

Shared by the weights (``growth.grow``) and the optimizer state (``growth.optimizer_state``):
both turn their target sharded tensors into read requests (``growth.retarget``) and read them
here through ``checkpoint.reader`` (torch DCP's reader, this rank only: no collective per read).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import apply_factories

from megatron_grow.checkpoint import io
from megatron_grow.checkpoint.reader import CheckpointReader
from megatron_grow.growth import noise, retarget
from megatron_grow.growth.plan import GrowthPlan
from megatron_grow.parallel.collectives import all_reduce_host, rank, world_size


def target_sharded_tensors(model_chunks: Sequence[torch.nn.Module]) -> list:
    sd = io.model_sharded_state_dict(model_chunks)
    apply_factories(sd)
    return list(io.iter_sharded_tensors(sd))


def read_requests(requests: dict, reader: CheckpointReader) -> int:
    """Read this rank's requests (each a ShardedTensor naming a source region) into their ``data``.

    Local to this rank: no collective, so ranks read at their own pace (and writer threads may
    read while others write). The region is read in the stored dtype and cast to the request's
    (``Tensor.to``: the same rounding as the copy a load into that buffer does). Returns the bytes
    read (in the stored dtype).
    """
    nbytes = 0
    for st in requests.values():
        offsets = tuple(st.global_offset)
        sizes = (1,) * st.prepend_axis_num + tuple(st.local_shape)
        stored = reader.read(st.key, offsets, sizes)
        nbytes += stored.numel() * stored.element_size()
        st.data = stored.reshape(st.local_shape).to(st.dtype)
    return nbytes


def expert_stds(tasks: list, plan: GrowthPlan, reader: CheckpointReader) -> dict:
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
    units = [(k, ls, es) for k in range(len(keys)) for ls in range(L) for es in range(E)]
    mine = units[rank()::world_size()]
    for k, ls, es in mine:
        st = templates[keys[k]]
        full = tuple(st.global_shape[2:])
        request = retarget._request(st, (ls, es) + (0,) * len(full), (L, E) + full, full)
        read_requests({0: request}, reader)
        # A rehearsal (growth.rehearsal) reads no data: its regions are meta tensors, their moments zero.
        data = request.data
        moments[k, ls, es] = torch.tensor(noise.tensor_moments(data) if not data.is_meta else (data.numel(), 0, 0),
                                          dtype=torch.float64)
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
