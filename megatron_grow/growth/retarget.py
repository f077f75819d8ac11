"""Rewrite a grown model's sharded state dict into read requests against the source checkpoint.

Assumed on-disk format: Megatron-Core ``torch_dist`` checkpoints of ``GPTModel``, where
per-layer tensors are stacked over layers (prepended axis 0 = global layer index) and
routed-expert tensors over layers and experts (prepended axes 0, 1)::

    decoder.layers.self_attention.linear_qkv.weight        [L, 3*Hq, H]   (TP on dim 1)
    decoder.layers.mlp.router.weight                        [L, E, H]      (one shard per layer)
    decoder.layers.mlp.router.expert_bias                   [L, E]
    decoder.layers.mlp.experts.experts.linear_fc1.weight    [L, E, 2F, H]  (EP on dim 1, TP on 2)
    decoder.layers.mlp.experts.experts.linear_fc2.weight    [L, E, H, F]   (EP on dim 1, TP on 3)
    embedding.word_embeddings.weight, output_layer.weight, decoder.final_layernorm.weight

For every target :class:`ShardedTensor` (after ``apply_factories``) this module builds a
:class:`SliceTask`: the *source* request (same key, the layer/expert axes moved through the
growth plan's index maps, a fresh buffer) and how to turn the loaded bytes into the target
slice (copy, or the operators' router/bias/expert transforms, ``growth.transforms``). Several
target slices may share one source request (layers 4 and 5 both read layer 2): requests are deduplicated by
``(key, global_offset, local_shape)``.

No I/O and no torch.distributed here: ``growth.grow`` loads the requests and applies the tasks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_grow.checkpoint import keys
from megatron_grow.errors import GrowthError
from megatron_grow.growth import mapping, noise, transforms
from megatron_grow.growth.plan import GrowthPlan

# Kinds of target slices.
UNCHANGED = "unchanged"   # outside the layers: embedding, output layer, final norm
LAYER = "layer"           # a per-layer tensor moved with its layer (norms, attention, shared expert)
EXPERT = "expert"         # one routed expert's slice (EP/TP-local)
ROUTER = "router"         # [E, H] of one layer, grown as a whole
EXPERT_BIAS = "expert_bias"
# Kinds whose grown values are the same bits computed from the stored dtype as from fp32 when the stored dtype
# is the target's (copies; experts: the operators add noise in fp32 and round to their input's dtype once).
STORED_DTYPE_KINDS = (UNCHANGED, LAYER, EXPERT)


@dataclass
class SliceTask:
    """One target ShardedTensor and where its values come from."""

    target: Any                 # ShardedTensor; .data is (a view of) the model parameter
    kind: str
    request_id: tuple           # key into the deduplicated source requests
    target_layer: int | None = None
    target_expert: int | None = None
    source_layer: int | None = None
    source_expert: int | None = None
    logical_key: str | None = None   # noise.FC1_KEY / FC2_KEY for routed experts

    @property
    def region(self) -> tuple:
        """This slice's position inside its full per-expert tensor (dims after the prepended axes)."""
        st = self.target
        off = st.global_offset[st.prepend_axis_num:]
        return tuple(slice(o, o + n) for o, n in zip(off, st.local_shape))

    @property
    def full_shape(self) -> tuple:
        """The full per-expert (or per-layer) shape, without the prepended layer/expert axes."""
        st = self.target
        return tuple(st.global_shape[st.prepend_axis_num:])


def expert_logical_key(storage_key: str) -> str | None:
    """The noise's logical key of a routed-expert storage key.

    Args:
        storage_key: a routed-expert tensor's storage key.

    Returns:
        ``noise.FC1_KEY`` / ``noise.FC2_KEY``, or None for tensors copied exactly (biases).
    """
    if storage_key.endswith(keys.FC1_NAME):
        return noise.FC1_KEY
    if storage_key.endswith(keys.FC2_NAME):
        return noise.FC2_KEY
    return None  # biases (add_bias_linear) are copied exactly


def classify(st) -> str:
    """Which kind of target slice ``st`` is (``UNCHANGED``, ``LAYER``, ``ROUTER``, ``EXPERT_BIAS``, ``EXPERT``).

    Args:
        st: a target ShardedTensor.

    Returns:
        The kind.

    Raises:
        GrowthError: a layer-indexed layout this module cannot grow (legacy GroupedMLP).
    """
    if not keys.is_layer_key(st.key):
        return UNCHANGED
    if st.key.endswith(keys.ROUTER_SUFFIX):
        return ROUTER
    if st.key.endswith(keys.EXPERT_BIAS_SUFFIX):
        return EXPERT_BIAS
    layer_axes = _layer_axes(st)
    if st.prepend_axis_num == layer_axes + 1 and keys.ROUTED_EXPERTS_MARKER in st.key:
        return EXPERT
    if st.prepend_axis_num == layer_axes:
        return LAYER
    raise GrowthError(f"cannot grow tensor {st.key}: layer-indexed with {st.prepend_axis_num} prepended axes "
                      "(only the local and TE per-expert layouts are supported, not legacy GroupedMLP weight1/2)")


def _layer_axes(st) -> int:
    """1 when ``st`` is stacked over layers (an all-MoE stack), 0 when its key names its layer (a mixed
    dense/MoE stack, ``keys.per_layer_storage_key``)."""
    return 0 if keys.split_per_layer_key(st.key) else 1


def assign_expert_writers(targets: Iterable, plan: GrowthPlan, expert_blocks: int) -> None:
    """Let each writing rank of an offline growth produce the copies of the source experts it reads:
    every routed-expert slice's expert offset is moved through ``mapping.writer_slots`` (in place).

    The grown checkpoint holds the same tensors at the same global offsets either way (a load finds each
    chunk by its offset, whatever rank wrote it); only which rank writes which chunk changes. With the
    paper's appended copies on EP=2 the layout's own assignment gives the second rank a copy of every
    source expert: it would receive them all from the first rank and draw all the noise. Only for a
    checkpoint being written: a model that is run must hold its own experts (growth on load keeps them).

    Args:
        targets: this rank's sharded tensors of the grown model (after ``apply_factories``).
        plan: the growth plan.
        expert_blocks: the target layout's expert-parallel size.
    """
    slots = {j: mapping.writer_slots(src, plan.source.num_moe_experts, expert_blocks)
             for j, src in enumerate(plan.expert_source)}
    for st in targets:
        if classify(st) != EXPERT:
            continue
        per_layer = keys.split_per_layer_key(st.key)
        rest = 0 if per_layer else 1
        j = per_layer[0] if per_layer else st.global_offset[0]
        e = slots[j][st.global_offset[rest]]
        st.global_offset = st.global_offset[:rest] + (e,) + st.global_offset[rest + 1:]


def _request(st, offset: tuple, global_shape: tuple, local_shape: tuple, key: str | None = None):
    """A ShardedTensor asking the source checkpoint for ``local_shape`` at ``offset`` (fresh buffer),
    under the source's name ``key`` (default: the target's)."""
    prepend = st.prepend_axis_num
    fragments = tuple(g // (1 if i < prepend else n)
                      for i, (g, n) in enumerate(zip(global_shape, (1,) * prepend + tuple(local_shape))))
    # Growth computes in fp32 (noise added to the fp32 value) and rounds once to the target's dtype
    # when the slice is written: a bf16 target's request is read as fp32.
    compute_dtype = torch.float32 if st.dtype in (torch.bfloat16, torch.float16) else st.dtype
    buf = torch.empty(local_shape, dtype=compute_dtype, device="cpu")
    return dataclasses.replace(st, key=key or st.key, data=buf, dtype=compute_dtype, local_shape=tuple(local_shape),
                               global_shape=tuple(global_shape),
                               global_offset=tuple(offset), axis_fragmentations=fragments, replica_id=0,
                               flattened_range=None)


def build_tasks(target_sharded: Iterable, plan: GrowthPlan,
                source_key: Callable[[str], str] = lambda key: key) -> tuple[list[SliceTask], dict[tuple, Any]]:
    """Tasks for every target ShardedTensor, and the deduplicated source requests they read.

    Args:
        target_sharded: the grown model's ShardedTensors (after ``apply_factories``).
        plan: the growth plan.
        source_key: names a target tensor as the source checkpoint stores it (the layer specs
            differ in a few names, see ``checkpoint.keys.spec_storage_key``).

    Returns:
        (tasks, source requests by request id).
    """
    tasks: list[SliceTask] = []
    requests: dict[tuple, Any] = {}
    for st in target_sharded:
        if st.flattened_range is not None:
            raise GrowthError(f"{st.key}: flattened (optimizer-format) tensors cannot be grown as model weights")
        task, req = _task_and_request(st, plan, source_key(st.key))
        rid = (req.key, tuple(req.global_offset), tuple(req.local_shape))
        requests.setdefault(rid, req)
        task.request_id = rid
        tasks.append(task)
    return tasks, requests


def _task_and_request(st, plan: GrowthPlan, key: str) -> tuple[SliceTask, Any]:
    """One target slice's task and the source region it reads (layer/expert axes mapped back).

    A stacked key carries the layer as axis 0 (the source layer goes there, out of ``L_src``); a per-layer
    key names it (the source layer's key is read, with no layer axis)."""
    L_src, E_src = plan.source.num_layers, plan.source.num_moe_experts
    kind = classify(st)
    if kind == UNCHANGED:
        return SliceTask(st, kind, ()), _request(st, st.global_offset, st.global_shape, st.local_shape, key)
    per_layer = keys.split_per_layer_key(key)
    j = keys.split_per_layer_key(st.key)[0] if per_layer else st.global_offset[0]
    ls = plan.layer_source[j]
    if per_layer:
        key, lead, lead_shape, rest = keys.per_layer_storage_key(ls, per_layer[1]), (), (), 0
    else:
        lead, lead_shape, rest = (ls,), (L_src,), 1
    if kind == LAYER:
        req = _request(st, lead + st.global_offset[rest:], lead_shape + st.global_shape[rest:], st.local_shape, key)
        return SliceTask(st, kind, (), target_layer=j, source_layer=ls), req
    if kind == ROUTER:
        # One shard per layer: read the whole source [E_src, H] and grow it here.
        shape = (E_src,) + tuple(st.global_shape[rest + 1:])
        req = _request(st, lead + tuple(0 for _ in shape), lead_shape + shape, shape, key)
        return SliceTask(st, kind, (), target_layer=j, source_layer=ls), req
    if kind == EXPERT_BIAS:
        req = _request(st, lead + (0,), lead_shape + (E_src,), (E_src,), key)
        return SliceTask(st, kind, (), target_layer=j, source_layer=ls), req
    e = st.global_offset[rest]  # EXPERT
    es = plan.expert_source[j][e]
    req = _request(st, lead + (es,) + st.global_offset[rest + 1:],
                   lead_shape + (E_src,) + tuple(st.global_shape[rest + 1:]), st.local_shape, key)
    return SliceTask(st, kind, (), target_layer=j, target_expert=e, source_layer=ls, source_expert=es,
                     logical_key=expert_logical_key(st.key)), req


def grown_slice(task: SliceTask, source: torch.Tensor, plan: GrowthPlan,
                expert_std: dict | None = None) -> torch.Tensor:
    """The target slice's values, from its loaded source request.

    Args:
        task: the slice's task.
        source: the loaded source request's data.
        plan: the growth plan.
        expert_std: noise stds by (logical key, source layer, source expert) (``source_reads.expert_stds``).

    Returns:
        The values to copy into the target slice.
    """
    if task.kind in (UNCHANGED,):
        return source
    if task.kind == LAYER:
        if transforms.zeroed(plan, task.target_layer, task.target.key):
            return torch.zeros_like(source)
        return source
    if task.kind == ROUTER:
        return transforms.grow_router(plan, task.target_layer, source)
    if task.kind == EXPERT_BIAS:
        return transforms.grow_expert_bias(plan, task.target_layer, source)
    # EXPERT
    if task.logical_key is None:
        return torch.zeros_like(source) if transforms.zeroed(plan, task.target_layer, task.target.key) \
            else source
    std = 0.0
    if transforms.needs_expert_stats(plan):
        std = expert_std[(task.logical_key, task.source_layer, task.source_expert)]
    return transforms.grow_expert_tensor(plan, task.logical_key, task.target_layer, task.target_expert, source, std,
                                         full_shape=task.full_shape, region=task.region, may_alias=True)
