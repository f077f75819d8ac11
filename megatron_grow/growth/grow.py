"""Growth on load: fill a grown model, built in its target layout, straight from the source checkpoint.

Entry points:

* :func:`prepare_growth` reads the source checkpoint's self-description and the growth
  recipe, builds the :class:`GrowthPlan` and checks everything that can be checked before
  any tensor is read (every rank calls it; it only reads metadata).
* :func:`load_grown_weights` (collective) fills this rank's model chunks: it rewrites their
  sharded state dict through the plan (``retarget``), reads only this rank's slices from the
  source ``torch_dist`` checkpoint (one layer group at a time, so peak memory stays near the
  local model size), applies the growth transforms and verifies that every parameter was
  sourced. This is the *online* path the trainer uses for ``--grow-from``.
* :func:`grow_checkpoint` is the *offline* ``megatron-grow grow``: build the target model,
  ``load_grown_weights``, save atomically with the growth record appended to the lineage.

Noise does not depend on the layout (see ``growth.noise``), so the grown tensors are the
same whatever TP/PP/EP the target uses.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_grow.checkpoint import io, keys, layout
from megatron_grow.checkpoint.manifest import CheckpointInfo, read_checkpoint_info
from megatron_grow.config.schema import GrowthConfig, ModelConfig
from megatron_grow.errors import CheckpointError, GrowthError
from megatron_grow.growth import noise, retarget
from megatron_grow.growth.plan import GrowthPlan, make_growth_plan


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def log(msg: str) -> None:
    if _rank() == 0:
        print(f"[grow] {msg}", flush=True)


@dataclass
class GrowthSource:
    """A validated growth: the source checkpoint, its architecture and the plan."""

    root: str
    info: CheckpointInfo
    plan: GrowthPlan

    @property
    def ckpt_dir(self) -> str:
        return self.info.ckpt_dir


@dataclass
class LoadStats:
    bytes_read: int = 0
    tensors: int = 0
    groups: int = 0
    seconds: float = 0.0
    stats_seconds: float = 0.0
    per_group: list = field(default_factory=list)


def prepare_growth(source_path: str, growth: GrowthConfig, source_model: ModelConfig | None = None,
                   iteration: int | None = None) -> GrowthSource:
    """Resolve the source checkpoint and the plan; every problem is raised before any tensor is read."""
    if growth.optimizer == "carry":
        raise GrowthError(
            "growth.optimizer: carry is not available: it needs the optimizer state in model space (MCore's "
            "fully_reshardable distributed-optimizer format), and with megatron-core 0.16.1 and torch AdamW "
            "(no TE/apex) that format saves but cannot be loaded back (KeyError: 'step'); the dp_reshardable "
            "format we resume from is tied to the parameter layout. Use optimizer: reset (the paper's choice).")
    ckpt_dir, it = layout.resolve_checkpoint_dir(source_path, iteration)
    storage = io.read_storage_metadata(ckpt_dir)
    io.check_shard_files(ckpt_dir, storage)
    io.read_common_state(ckpt_dir)  # a damaged common.pt: one line now, not a traceback mid-load
    info = read_checkpoint_info(ckpt_dir, it)
    if source_model is not None:
        info.model = source_model
    if info.model is None:
        raise CheckpointError(f"{ckpt_dir} does not record its architecture; pass --source-config "
                              "with the source model's recipe")
    plan = make_growth_plan(info.model, growth)
    _check_source_shapes(plan.source, storage, ckpt_dir)
    return GrowthSource(source_path, info, plan)


def _check_source_shapes(model: ModelConfig, storage, ckpt_dir: str) -> None:
    """The source architecture must agree with the stored tensors: name the tensor and both shapes."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_grow.models.mcore_config import padded_vocab_size

    L, E, H, F = model.num_layers, model.num_moe_experts, model.hidden_size, model.moe_ffn_hidden_size
    q = model.num_attention_heads * model.kv_channels
    kv = model.num_query_groups * model.kv_channels
    expected = {
        keys.QKV: (L, q + 2 * kv, H),
        keys.PROJ: (L, H, q),
        keys.ROUTER: (L, E, H),
        keys.EXPERT_FC1: (L, E, 2 * F if model.gated_linear_unit else F, H),
        keys.EXPERT_FC2: (L, E, H, F),
    }
    if model.moe_router_enable_expert_bias:
        expected[keys.EXPERT_BIAS] = (L, E)
    stored = {k: tuple(v.size) for k, v in storage.state_dict_metadata.items()
              if isinstance(v, TensorStorageMetadata)}
    emb = stored.get(keys.EMBEDDING)
    if emb is not None:
        vocab_ok = {padded_vocab_size(model, tp) for tp in (1, 2, 4, 8)} | {model.vocab_size}
        if emb[0] not in vocab_ok or emb[1] != H:
            raise GrowthError(f"source architecture disagrees with {ckpt_dir}: embedding.word_embeddings.weight "
                              f"is {emb} in the checkpoint, the source config implies "
                              f"({padded_vocab_size(model)}, {H})")
    for key, shape in expected.items():
        if key not in stored:
            raise GrowthError(f"source architecture disagrees with {ckpt_dir}: tensor {key} (expected {shape}) "
                              "is not in the checkpoint")
        if stored[key] != shape:
            raise GrowthError(f"source architecture disagrees with {ckpt_dir}: tensor {key} is {stored[key]} "
                              f"in the checkpoint, the source config implies {shape}")


# ------------------------------------------------------------------------------------------------
# Loading


def _target_sharded_tensors(model_chunks: Sequence[torch.nn.Module]) -> list:
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sd = io.model_sharded_state_dict(model_chunks)
    apply_factories(sd)
    return list(io.iter_sharded_tensors(sd))


def _collective_load(requests: dict, ckpt_dir: str, whole_tensors: dict | None = None) -> None:
    """One dist_checkpointing load of this rank's requests (possibly none); every rank calls it.

    With a single rank, MCore's torch_dist loader cannot read part of a tensor (torch's
    ShardedTensor needs the shard grid to cover the tensor, and MCore places the cells it was
    not asked for on rank ``(rank + 1) % world_size``, i.e. this rank). So one rank reads each
    source tensor whole, once (cached in ``whole_tensors``), and slices it: a 1-rank growth
    holds the source tensors it reads beside the grown model.
    """
    from megatron.core import dist_checkpointing

    if _world() == 1:
        cache = whole_tensors if whole_tensors is not None else {}
        missing = {st.key: st for st in requests.values() if st.key not in cache}
        if missing:
            whole = {key: _whole_request(st) for key, st in missing.items()}
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


def _whole_request(st):
    """A request for the whole stored tensor ``st.key`` (prepended axes become real dims)."""
    shape = tuple(st.global_shape)
    return dataclasses.replace(st, data=torch.empty(shape, dtype=st.dtype), local_shape=shape,
                               global_offset=(0,) * len(shape), axis_fragmentations=(1,) * len(shape),
                               prepend_axis_num=0, replica_id=0, flattened_range=None)


def _expert_stds(tasks: list, plan: GrowthPlan, ckpt_dir: str) -> dict:
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
    mine = units[_rank()::_world()]
    world_rounds = math.ceil(len(units) / _world())
    per_round = max(1, E)  # read about one layer of experts per collective round
    for start in range(0, world_rounds, per_round):
        batch = mine[start:start + per_round]
        requests = {}
        for k, ls, es in batch:
            st = templates[keys[k]]
            full = tuple(st.global_shape[2:])
            requests[(k, ls, es)] = retarget._request(st, (ls, es) + (0,) * len(full), (L, E) + full, full)
        _collective_load(requests, ckpt_dir, whole)
        for (k, ls, es), st in requests.items():
            moments[k, ls, es] = torch.tensor(noise.tensor_moments(st.data), dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(moments)
    out = {}
    for k, key in enumerate(keys):
        for ls in range(L):
            per_expert = [noise.Moments(int(n), float(mu), float(m2)) for n, mu, m2 in moments[k, ls].tolist()]
            for es in range(E):
                out[(key, ls, es)] = noise.expert_noise_std(plan, per_expert, es)
    return out


def _group_of(task) -> Any:
    # By *source* layer: all copies of a layer share its requests, which are freed after the group.
    return ("layer", task.source_layer) if task.source_layer is not None else ("other", 0)


@torch.no_grad()
def load_grown_weights(model_chunks: Sequence[torch.nn.Module], source: GrowthSource,
                       progress: bool = True) -> LoadStats:
    """Fill ``model_chunks`` (this rank's part of the grown model) from the source checkpoint."""
    stats = LoadStats()
    t0 = time.perf_counter()
    plan = source.plan
    _check_target_model(model_chunks, plan.target)
    tensors = _target_sharded_tensors(model_chunks)
    tasks, requests = retarget.build_tasks(tensors, plan)
    # The source must hold every tensor the target asks for, with the global shape we expect.
    io.check_against_checkpoint({"r": list(requests.values())}, source.ckpt_dir)
    poison_parameters(model_chunks)

    ts = time.perf_counter()
    expert_std = _expert_stds(tasks, plan, source.ckpt_dir)
    stats.stats_seconds = time.perf_counter() - ts

    groups: dict[Any, list] = {}
    for t in tasks:
        groups.setdefault(_group_of(t), []).append(t)
    order = sorted(groups, key=lambda g: (g[0] != "other", g[1]))
    rounds = len(order)
    if torch.distributed.is_initialized():  # PP stages hold different layer counts
        n = torch.tensor([rounds], dtype=torch.long)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        rounds = int(n.item())
    whole: dict = {}
    for r in range(rounds):
        group_tasks = groups[order[r]] if r < len(order) else []
        group_requests = {t.request_id: requests[t.request_id] for t in group_tasks}
        tg = time.perf_counter()
        _collective_load(group_requests, source.ckpt_dir, whole)
        for t in group_tasks:
            value = retarget.grown_slice(t, requests[t.request_id].data, plan, expert_std)
            t.target.data.copy_(value.to(t.target.data.dtype))
        nbytes = sum(st.data.numel() * st.data.element_size() for st in group_requests.values())
        for st in group_requests.values():
            st.data = torch.empty(0, dtype=st.data.dtype)  # free the buffer; peak stays ~ one group
        stats.bytes_read += nbytes
        stats.tensors += len(group_tasks)
        stats.groups += 1
        stats.per_group.append((order[r] if r < len(order) else None, nbytes, time.perf_counter() - tg))
        if progress:
            name = order[r] if r < len(order) else None
            if name is None:
                label = "(no tensors on this rank)"
            elif name == ("other", 0):
                label = "embedding, output layer, final norm"
            else:
                targets = sorted({t.target_layer for t in group_tasks})
                label = f"source layer {name[1]} -> target layers {targets}"
            log(f"group {r + 1}/{rounds}: {label}: {len(group_tasks)} tensors, {nbytes / 2**20:.1f} MiB "
                f"in {time.perf_counter() - tg:.2f}s")
    whole.clear()
    verify_all_sourced(model_chunks)
    stats.seconds = time.perf_counter() - t0
    return stats


def _check_target_model(model_chunks, target: ModelConfig) -> None:
    cfg = model_chunks[0].config
    for name in ("num_layers", "num_moe_experts", "moe_router_topk", "hidden_size", "moe_ffn_hidden_size"):
        if getattr(cfg, name) != getattr(target, name):
            raise GrowthError(f"the model being filled has {name}={getattr(cfg, name)}, but the growth plan's "
                              f"target needs {getattr(target, name)}")


def _persistent_tensors(module: torch.nn.Module):
    yield from module.named_parameters()
    for mod_name, mod in module.named_modules():
        for b_name, b in mod._buffers.items():
            if b is not None and b_name not in mod._non_persistent_buffers_set and b.is_floating_point():
                yield f"{mod_name}.{b_name}" if mod_name else b_name, b


@torch.no_grad()
def poison_parameters(model_chunks) -> None:
    """NaN-fill every parameter and persistent buffer, so anything the load misses is detectable."""
    for chunk in model_chunks:
        for _, t in _persistent_tensors(chunk):
            t.fill_(float("nan"))


def verify_all_sourced(model_chunks) -> None:
    missing = []
    for i, chunk in enumerate(model_chunks):
        for name, t in _persistent_tensors(chunk):
            if torch.isnan(t).any():
                missing.append(f"chunk {i}: {name}")
    if missing:
        raise GrowthError(f"rank {_rank()}: {len(missing)} tensors of the grown model were not sourced from the "
                          f"checkpoint (left at their init): {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else ""))


# ------------------------------------------------------------------------------------------------
# The growth record and the offline command


def growth_record(source: GrowthSource, params_before: int, params_after: int, seconds: float) -> dict:
    g = source.plan.growth
    return {
        "operators": list(source.plan.order),
        "depth": dataclasses.asdict(g.depth) if g.depth else None,
        "width": dataclasses.asdict(g.width) if g.width else None,
        "seed": g.seed,
        "optimizer": g.optimizer,
        "source_path": os.path.abspath(source.root),
        "source_iteration": source.info.iteration,
        "source_model": dataclasses.asdict(source.plan.source),
        "params_before": params_before,
        "params_after": params_after,
        "source_flops_so_far": source.info.counters.get("flops_so_far", 0),
        "time": io.now(),
        "seconds": round(seconds, 3),
    }


def grown_counters(source: GrowthSource) -> dict:
    """Counters a resumed run needs: position and FLOPs carry over; all of it is now sunk cost."""
    c = dict(source.info.counters)
    c["sunk_flops"] = c.get("flops_so_far", 0)
    return c


def grow_load_into(model_chunks, source: GrowthSource, started: float, progress: bool = True) -> dict:
    """Online growth (collective): fill ``model_chunks`` and return the counters and lineage the
    grown model carries (what the trainer's first checkpoint records)."""
    from megatron_grow.models.params import count_params

    load_grown_weights(model_chunks, source, progress=progress)
    before, after = count_params(source.plan.source).total, count_params(source.plan.target).total
    record = io.broadcast_object(growth_record(source, before, after, time.perf_counter() - started))
    return {"counters": grown_counters(source), "lineage": source.info.lineage + [record]}


def prepare_destination(save: str, overwrite: bool, source_root: str) -> None:
    """Everything about --save that can go wrong, found before anything is read or written.

    The source is never modified: --save may not be the source, lie inside it or contain it
    (paths compared after resolving links). A non-empty --save needs --overwrite, and then it
    is replaced only once the new checkpoint is complete (``io.save_checkpoint_replacing``).
    """
    protected = [source_root]
    parent = os.path.dirname(os.path.normpath(source_root))
    if layout.is_iteration_dir(source_root) and os.path.isfile(os.path.join(parent, layout.TRACKER_FILENAME)):
        protected.append(parent)  # --load ROOT/iter_N: the whole run directory is the source
    for src in protected:
        problem = layout.nesting(save, src)
        if problem:
            raise GrowthError(f"--save {save} {problem} the source checkpoint {src}; the source is never "
                              "modified, choose another directory")
    if os.path.lexists(save) and not os.path.isdir(save):
        raise GrowthError(f"--save {save} exists and is not a directory")
    if os.path.isdir(save) and os.listdir(save) and not overwrite:
        raise GrowthError(f"--save {save} exists and is not empty; pass --overwrite to replace it")
    layout.probe_writable(save, "--save")


def grow_checkpoint(load: str, save: str, growth: GrowthConfig, parallel, *, source_model=None,
                    recipe_dict: dict | None = None, overwrite: bool = False, seed: int = 1234,
                    progress: bool = True) -> dict:
    """Offline growth (collective): returns a summary dict (rank 0's numbers)."""
    from megatron_grow.models.params import count_params
    from megatron_grow.parallel.init import initialize_distributed

    t0 = time.perf_counter()
    prepare_destination(save, overwrite, load)
    source = prepare_growth(load, growth, source_model)
    plan = source.plan
    from megatron_grow.config.layout_rules import model_layout_problems

    # Before initialize_distributed: its world-size check would otherwise hide the real problem
    # (e.g. 16 grown experts on EP=3 reported as "world size 1 is not divisible by 3").
    problems = model_layout_problems(plan.target, parallel)
    if problems:
        raise GrowthError("target layout does not fit the grown model: " + "; ".join(problems))
    ctx = initialize_distributed(parallel, seed=seed)
    log(f"source {source.ckpt_dir} (iteration {source.info.iteration}); "
        f"{' then '.join(plan.order)}: layers {plan.source.num_layers} -> {plan.target.num_layers}, "
        f"experts {plan.source.num_moe_experts} -> {plan.target.num_moe_experts}, "
        f"top-k {plan.source.moe_router_topk} -> {plan.target.moe_router_topk}; target layout "
        f"TP={ctx.layout.tp} PP={ctx.layout.pp} EP={ctx.layout.ep} DP={ctx.layout.dp}")
    from megatron_grow.models.builder import build_model_chunks

    chunks = build_model_chunks(plan.target, parallel, initialize=False)  # every weight comes from SRC
    stats = load_grown_weights(chunks, source, progress=progress)
    before, after = count_params(plan.source).total, count_params(plan.target).total
    record = growth_record(source, before, after, time.perf_counter() - t0)
    from megatron_grow.checkpoint.manifest import build_manifest

    counters = grown_counters(source)
    manifest = build_manifest(model=plan.target, recipe=recipe_dict,
                              layout=dict(tp=ctx.layout.tp, pp=ctx.layout.pp, ep=ctx.layout.ep,
                                          etp=ctx.layout.etp, dp=ctx.layout.dp, world_size=ctx.world_size),
                              counters=counters, lineage=source.info.lineage + [record])
    manifest = io.broadcast_object(manifest)  # the common state must be identical on every rank
    ts = time.perf_counter()
    state = io.model_sharded_state_dict(chunks)
    state.update(common_state(counters, manifest))
    # Written beside --save, then swapped in: an old --save (with --overwrite) goes only after.
    final = io.save_checkpoint_replacing(save, counters["iteration"], state, manifest)
    save_seconds = time.perf_counter() - ts
    total = time.perf_counter() - t0
    bytes_written = io.checkpoint_bytes(final) if _rank() == 0 else 0
    totals = torch.tensor([stats.bytes_read], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    summary = {
        "source": source.ckpt_dir, "grown": final, "iteration": counters["iteration"],
        "params_before": before, "params_after": after,
        "bytes_read": int(totals[0].item()), "bytes_written": bytes_written,
        "load_seconds": stats.seconds, "stats_seconds": stats.stats_seconds, "save_seconds": save_seconds,
        "seconds": total, "world_size": ctx.world_size,
        "throughput_gib_s": (bytes_written / 2**30) / total if total > 0 else 0.0,
    }
    return summary


def common_state(counters: dict, manifest: dict) -> dict:
    """Non-sharded entries of a checkpoint, named as Megatron-LM names them where it has a name."""
    return {
        "iteration": counters["iteration"],
        "checkpoint_version": 3.0,
        "num_floating_point_operations_so_far": counters.get("flops_so_far", 0),
        "megatron_grow": manifest,
    }


def print_summary(summary: dict, file=sys.stdout) -> None:
    rows = [
        ("source", summary["source"]), ("grown checkpoint", summary["grown"]),
        ("iteration", summary["iteration"]),
        ("parameters", f"{summary['params_before']:,} -> {summary['params_after']:,} "
                       f"({summary['params_after'] / max(summary['params_before'], 1):.2f}x)"),
        ("bytes read (all ranks)", f"{summary['bytes_read'] / 2**20:,.1f} MiB"),
        ("bytes written", f"{summary['bytes_written'] / 2**20:,.1f} MiB"),
        ("ranks", summary["world_size"]),
        ("time", f"{summary['seconds']:.2f}s (stats {summary['stats_seconds']:.2f}s, load "
                 f"{summary['load_seconds']:.2f}s, save {summary['save_seconds']:.2f}s)"),
        ("throughput", f"{summary['throughput_gib_s'] * 1024:.1f} MiB/s written"),
    ]
    width = max(len(r[0]) for r in rows)
    print("grow summary", file=file)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=file)
