"""Reading a source checkpoint for growth: region reads, the noise statistics, read groups.

Shared by the weights (``growth.grow``) and the optimizer state (``growth.optimizer_state``):
both turn their target sharded tensors into read requests (``growth.retarget``) and read them
here through ``checkpoint.reader`` (torch DCP's reader, this rank only: no collective per read).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import apply_factories

from megatron_grow.checkpoint import io
from megatron_grow.checkpoint import keys as ckpt_keys
from megatron_grow.checkpoint.integrity import check_finite
from megatron_grow.checkpoint.reader import CheckpointReader
from megatron_grow.config.schema import moe_layer_pattern
from megatron_grow.errors import CheckpointError, GrowthError
from megatron_grow.growth import noise, retarget, transforms
from megatron_grow.growth.plan import GrowthPlan
from megatron_grow.parallel.collectives import all_reduce_host, rank, world_size


def target_sharded_tensors(model_chunks: Sequence[torch.nn.Module]) -> list:
    """This rank's sharded tensors of ``model_chunks`` (after ``apply_factories``).

    Args:
        model_chunks: the grown model's chunks.

    Returns:
        The ShardedTensors.
    """
    sd = io.model_sharded_state_dict(model_chunks)
    apply_factories(sd)
    return list(io.iter_sharded_tensors(sd))


def read_requests(requests: dict, reader: CheckpointReader, require_finite: bool = True, cast: bool = True) -> int:
    """Read this rank's requests (each a ShardedTensor naming a source region) into their ``data``.

    A region holding NaN or ±inf is a CheckpointError naming the tensor (growth would copy it into
    every grown copy) unless ``require_finite`` is False (the caller checks, collectively).

    Local to this rank: no collective, so ranks read at their own pace (and writer threads may
    read while others write). The region is read in the stored dtype and cast to the request's
    (``Tensor.to``: the same rounding as the copy a load into that buffer does).

    Args:
        requests: ShardedTensors by request id.
        reader: SRC's region reader.
        require_finite: check every region for NaN and ±inf.
        cast: cast to the request's dtype; False keeps the stored dtype (the caller casts where it computes).

    Returns:
        The bytes read (in the stored dtype).
    """
    nbytes = 0
    for st in requests.values():
        offsets = tuple(st.global_offset)
        sizes = (1,) * st.prepend_axis_num + tuple(st.local_shape)
        stored = reader.read(st.key, offsets, sizes)
        if require_finite and not stored.is_meta:  # a rehearsal (growth.rehearsal) reads no values
            check_finite(st.key, stored, reader.ckpt_dir, f" (offsets {offsets}, sizes {sizes})")
        nbytes += stored.numel() * stored.element_size()
        st.data = stored.reshape(st.local_shape)
        if cast:
            st.data = st.data.to(st.dtype)
    return nbytes


def expert_stds(tasks: list, plan: GrowthPlan, reader: CheckpointReader) -> dict:
    """Per (logical key, source layer, source expert) noise stds (collective): :func:`expert_stats`
    without keeping any region.

    Args:
        tasks: this rank's growth tasks (their routed-expert tensors name the keys).
        plan: the growth plan.
        reader: SRC's region reader.

    Returns:
        The stds; empty when no operator needs them.
    """
    return expert_stats(tasks, plan, reader)[0]


def expert_stats(tasks: list, plan: GrowthPlan, reader: CheckpointReader,
                 wanted: dict | None = None) -> tuple[dict, dict]:
    """Noise stds per (logical key, source layer, source expert), from the full source expert tensors,
    and the full expert regions among ``wanted`` this rank read for them (collective).

    Each full per-expert tensor ("unit") is measured by exactly one rank (:func:`_unit_owner`), which
    alone reads it from storage; a rank that writes from a unit another rank measures receives it from
    that rank (one broadcast per layer and measuring rank), and the needed units are returned (stored
    dtype) so that their copies are written from them: every source expert is read once in all, for the
    statistics and every copy. Moments are summed across ranks (exact: every entry is non-zero on one
    rank only) and combined in expert order, so every rank derives the same stds whatever the layout.

    Args:
        tasks: this rank's growth tasks (their routed-expert tensors name the keys).
        plan: the growth plan.
        reader: SRC's region reader.
        wanted: source requests by id that this rank will write from (None: keep nothing).

    Returns:
        (the stds, empty when no operator needs them; the kept regions by request id).
    """
    if not transforms.needs_expert_stats(plan):
        return {}, {}
    L, E = plan.source.num_layers, plan.source.num_moe_experts
    templates: dict[str, Any] = {}
    for t in tasks:
        if t.kind == retarget.EXPERT and t.logical_key is not None:
            # The source's name of the weight: a request id is (key, offset, shape), optimizer-state
            # tasks prefix it with their state (optimizer_state._tasks_for).
            templates.setdefault(t.logical_key, (t.target, t.request_id[-3]))
    keys = sorted(templates)
    # Every rank must agree on the key list: every rank must hold an MoE layer (always so when every
    # layer is MoE; a pipeline stage of dense layers only has no template to read with).
    _check_templates_everywhere(keys)
    moe = moe_layer_pattern(plan.source)
    units = [(k, ls, es) for k in range(len(keys)) for ls in range(L) if moe[ls] for es in range(E)]

    def expert_request(k: int, ls: int, es: int):
        st, source_key = templates[keys[k]]
        return _whole_expert_request(st, source_key, L, E, ls, es)

    requests = [expert_request(*u) for u in units]
    parts = _parts_within_units(requests, wanted or {})
    needed = [u in parts for u in range(len(units))]
    owners = [_unit_owner(es, E) for _, _, es in units]
    moments, held, error = _read_units(units, requests, owners, needed, reader, (len(keys), L, E))
    kept = {rid: held[u][region] for u, found in parts.items() if u in held for rid, region in found}
    _raise_on_every_rank(error)
    if torch.distributed.is_initialized():
        all_reduce_host(moments)
    _check_finite_moments(moments, expert_request, reader.ckpt_dir)
    out = {}
    for k, key in enumerate(keys):
        for ls in range(L):
            per_expert = [noise.Moments(int(n), float(mu), float(m2)) for n, mu, m2 in moments[k, ls].tolist()]
            for es in range(E):
                out[(key, ls, es)] = transforms.expert_noise_std(plan, per_expert, es)
    return out, kept


def _read_units(units: list, requests: list, owners: list, needed: list, reader: CheckpointReader,
                shape: tuple) -> tuple[torch.Tensor, dict, str | None]:
    """Read the units this rank measures; the units it needs and another rank measures come from that
    rank (:func:`_share_layer`), so every source expert is read from storage once in all. Returns (the
    moments of the measured units, zero elsewhere; the needed units by index, stored dtype; the first
    read error or None). Without a process group (one rank) a needed unit is read here."""
    moments = torch.zeros(*shape, 3, dtype=torch.float64)
    kept: dict = {}
    error = None
    sharing = torch.distributed.is_initialized() and world_size() > 1
    meta = reader.buffer_device == "meta"  # a rehearsal: regions without data, a fake process group
    if sharing:
        elsewhere = _needed_elsewhere(needed, owners, meta)
    by_layer: dict[int, list[int]] = {}
    for u, (_, ls, _) in enumerate(units):
        by_layer.setdefault(ls, []).append(u)
    for ls, layer_units in by_layer.items():
        read: dict[int, torch.Tensor] = {}
        for u in layer_units:
            if error is None and (owners[u] == rank() or (needed[u] and not sharing)):
                try:  # non-finite values are checked by the caller, from the moments, on every rank alike
                    read[u] = _read_unit(requests[u], reader)
                except CheckpointError as e:  # a damaged shard: every rank leaves the collective the same way
                    error = str(e)
        for u, data in read.items():
            if owners[u] == rank():  # a rehearsal (growth.rehearsal) reads meta tensors: no values, moments zero
                k, _, es = units[u]
                moments[k, ls, es] = torch.tensor(noise.tensor_moments(data) if not data.is_meta
                                                  else (data.numel(), 0, 0), dtype=torch.float64)
        if sharing:
            read.update(_share_layer(layer_units, requests, owners, needed, elsewhere, read, reader, meta))
        for u in layer_units:
            if needed[u] and u in read:
                kept[u] = read[u]
    return moments, kept, error


def _parts_within_units(units: list, wanted: dict) -> dict:
    """Per unit index, the wanted requests inside that whole source expert and their region in it: a
    whole expert, or a part of one (Megatron-Core stores a gated fc1 as two halves, each its own request).

    Args:
        units: whole-expert requests.
        wanted: source requests by id.

    Returns:
        ``{unit index: [(request id, slices into the unit), ...]}``.
    """
    index = {(r.key, tuple(r.global_offset[:r.prepend_axis_num])): u for u, r in enumerate(units)}
    parts: dict = {}
    for rid, req in wanted.items():
        u = index.get((req.key, tuple(req.global_offset[:req.prepend_axis_num])))
        if u is None or units[u].prepend_axis_num != req.prepend_axis_num:
            continue
        p = req.prepend_axis_num
        start = [o - uo for o, uo in zip(req.global_offset[p:], units[u].global_offset[p:])]
        if all(0 <= a and a + n <= full for a, n, full in zip(start, req.local_shape, units[u].local_shape)):
            parts.setdefault(u, []).append((rid, tuple(slice(a, a + n) for a, n in zip(start, req.local_shape))))
    return parts


def _read_unit(request, reader: CheckpointReader) -> torch.Tensor:
    sizes = (1,) * request.prepend_axis_num + tuple(request.local_shape)
    return reader.read(request.key, tuple(request.global_offset), sizes).reshape(request.local_shape)


def _needed_elsewhere(needed: list, owners: list, meta: bool) -> list:
    """Per unit: does a rank other than the one measuring it need it whole (collective, one all-gather of
    the needed flags; a rehearsal's fake process group moves nothing, so there: nothing)."""
    mine = torch.tensor(needed, dtype=torch.uint8)
    every = [torch.zeros_like(mine) for _ in range(world_size())]
    if not meta:
        torch.distributed.all_gather(every, mine)
    return [any(int(every[r][u]) for r in range(world_size()) if r != owners[u]) for u in range(len(needed))]


def _share_layer(layer_units: list, requests: list, owners: list, needed: list, elsewhere: list, read: dict,
                 reader: CheckpointReader, meta: bool) -> dict:
    """This rank's needed units of one layer that other ranks read (collective: one broadcast per
    measuring rank with units another rank needs, the same sequence on every rank, all sizes known
    from the metadata). A unit whose read failed is sent as zeros (the error is raised everywhere
    after). In a rehearsal (regions on ``meta``) nothing moves: the needed units are meta tensors."""
    out: dict[int, torch.Tensor] = {}
    for owner in sorted({owners[u] for u in layer_units}):
        if meta:
            if owner != rank():
                for u in layer_units:
                    if owners[u] == owner and needed[u]:
                        r = requests[u]
                        out[u] = torch.empty(tuple(r.local_shape), dtype=reader.stored(r.key).dtype, device="meta")
            continue
        sent = [u for u in layer_units if owners[u] == owner and elsewhere[u]]
        if not sent:
            continue
        dtypes = [reader.stored(requests[u].key).dtype for u in sent]
        shapes = [tuple(requests[u].local_shape) for u in sent]
        sizes = [math.prod(sh) * dt.itemsize for sh, dt in zip(shapes, dtypes)]
        buf = torch.zeros(sum(sizes), dtype=torch.uint8)
        at = 0
        for u, n in zip(sent, sizes):
            if owner == rank() and u in read:
                buf[at:at + n] = read[u].reshape(-1).view(torch.uint8)
            at += n
        torch.distributed.broadcast(buf, src=owner)
        at = 0
        for u, n, sh, dt in zip(sent, sizes, shapes, dtypes):
            if owner != rank() and needed[u]:
                out[u] = buf[at:at + n].clone().view(dt).reshape(sh)
                reader.bytes_received += n
            at += n
    return out


def _unit_owner(es: int, num_experts: int) -> int:
    """The rank that reads and measures source expert ``es`` (of any layer): each layer's experts in
    contiguous blocks over the ranks, the same on every rank without communication (so the rehearsal,
    which simulates ranks one at a time, predicts the same reads). Every rank reads a share of every
    layer, so the layer-by-layer exchange (:func:`_share_layer`) keeps all ranks reading; expert-parallel
    ranks hold the same blocks, so a rank mostly measures experts it writes anyway."""
    return es * world_size() // num_experts


def _whole_expert_request(st, source_key: str, L: int, E: int, ls: int, es: int):
    """A request for source expert ``es`` of source layer ``ls``, whole, shaped after target tensor ``st``
    (stacked storage: under the source's name ``source_key``)."""
    per_layer = ckpt_keys.split_per_layer_key(st.key)
    if per_layer:  # a mixed dense/MoE stack: the source layer's own key, experts on axis 0
        full = tuple(st.global_shape[1:])
        key = ckpt_keys.per_layer_storage_key(ls, per_layer[1])
        return retarget._request(st, (es,) + (0,) * len(full), (E,) + full, full, key)
    full = tuple(st.global_shape[2:])
    return retarget._request(st, (ls, es) + (0,) * len(full), (L, E) + full, full, source_key)


def _check_templates_everywhere(logical_keys: list) -> None:
    """Raise on every rank when some rank holds no routed-expert tensor to read the statistics with."""
    counts = [len(logical_keys)]
    if torch.distributed.is_initialized() and world_size() > 1:
        counts = [None] * world_size()
        torch.distributed.all_gather_object(counts, len(logical_keys))
    if len(set(counts)) > 1:
        raise GrowthError("width noise statistics need an MoE layer on every rank; a pipeline stage of dense "
                          "layers only holds none: grow with parallel.pipeline_model_parallel_size 1 (then "
                          "re-shard by loading) or growth.width.noise: none")


def _raise_on_every_rank(error: str | None) -> None:
    """The first rank's read error, raised on every rank (one that raised alone would leave the
    others waiting in the all-reduce, then dying with gloo's "connection closed by peer")."""
    errors = [error]
    if torch.distributed.is_initialized() and world_size() > 1:
        errors = [None] * world_size()
        torch.distributed.all_gather_object(errors, error)
    found = next((e for e in errors if e), None)
    if found:
        raise CheckpointError(found)


def _check_finite_moments(moments: torch.Tensor, expert_request: Callable, ckpt_dir: str) -> None:
    """NaN or ±inf in a source expert makes its moments non-finite: every rank holds the summed
    moments, so every rank raises the same error naming the first such expert (no rank waits)."""
    bad = (~torch.isfinite(moments)).any(dim=-1).nonzero()
    if len(bad):
        k, ls, es = (int(i) for i in bad[0])
        raise CheckpointError(f"tensor {expert_request(k, ls, es).key} (layer {ls}, expert {es}) of {ckpt_dir} holds "
                              f"non-finite values (NaN or infinite); nothing can be built from it")


def group_of(task) -> Any:
    # By *source* layer: all copies of a layer share its requests, which are freed after the group.
    """The read group of a task: its *source* layer (all copies of a layer share its requests,
    which are freed after the group), or one group for the tensors outside the layers.
    """
    return ("layer", task.source_layer) if task.source_layer is not None else ("other", 0)


def layer_groups(tasks: list) -> tuple[list, dict]:
    """Tasks grouped by the source layer they read, in reading order (non-layer tensors first).

    Args:
        tasks: growth tasks.

    Returns:
        (group names in reading order, tasks by group name).
    """
    groups: dict[Any, list] = {}
    for t in tasks:
        groups.setdefault(group_of(t), []).append(t)
    return sorted(groups, key=lambda g: (g[0] != "other", g[1])), groups
