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
* :func:`grow_checkpoint` is the *offline* ``megatron-grow grow``: build the target model on
  the meta device, plan the same reads, and save atomically (growth record appended to the
  lineage) while ``growth.streamed`` computes each grown slice as the writer asks for it: the
  grown model is never in memory.

Noise does not depend on the layout (see ``growth.noise``), so the grown tensors are the
same whatever TP/PP/EP the target uses.

The source architecture is resolved once (``checkpoint.architecture``: an explicit source model,
else ``megatron_grow.json``, else Megatron-LM's ``args``); the source may be stored under the TE
or the local layer spec's names (read requests are renamed to the source's, ``checkpoint.keys``),
and the grown checkpoint is written under the names of the requested target spec, with the
common state Megatron-LM's ``load_checkpoint`` reads (``checkpoint.megatron_args``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from megatron.core.dist_checkpointing.mapping import apply_factories
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_grow.checkpoint import io, keys, paths
from megatron_grow.checkpoint.architecture import load_common_state, resolve_architecture
from megatron_grow.checkpoint.fill_check import poison_parameters, verify_all_sourced
from megatron_grow.checkpoint.grown_start import GrownStart
from megatron_grow.checkpoint.manifest import build_manifest, read_checkpoint_info
from megatron_grow.checkpoint.megatron_args import common_state, megatron_args
from megatron_grow.config.layout_rules import model_layout_problems, padded_vocab_size
from megatron_grow.config.schema import GrowthConfig, ModelConfig, ParallelConfig, is_mixed_stack, moe_layer_pattern
from megatron_grow.errors import GrowthError
from megatron_grow.growth import optimizer_state, retarget
from megatron_grow.growth.plan import make_growth_plan
from megatron_grow.growth.source import GrowthSource
from megatron_grow.growth.source_reads import expert_stats, layer_groups, read_requests, target_sharded_tensors
from megatron_grow.growth.streamed import GrownTensors, is_main_replica
from megatron_grow.log import component_log
from megatron_grow.models.builder import build_model_chunks
from megatron_grow.models.params import count_params
from megatron_grow.models.specs import built_with_te
from megatron_grow.parallel.collectives import all_reduce_host, rank
from megatron_grow.parallel.init import initialize_distributed

log = component_log("grow")

# ``grow --dtype``: the grown weights' stored dtype (``auto``: SRC's, see ``output_dtype``).
OUTPUT_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class LoadStats:
    """What an online load read and how long it took (``load_grown_weights``; per group: name, bytes, seconds)."""
    bytes_read: int = 0
    tensors: int = 0
    groups: int = 0
    seconds: float = 0.0
    stats_seconds: float = 0.0
    per_group: list = field(default_factory=list)


def prepare_growth(source_path: str, growth: GrowthConfig, source_model: ModelConfig | None = None,
                   iteration: int | None = None) -> GrowthSource:
    """Resolve the source checkpoint and the plan; every problem is raised before any tensor is read.

    Args:
        source_path: SRC: a run directory with a tracker, or an ``iter_N`` directory.
        growth: the recipe's growth section.
        source_model: SRC's architecture (``--source-config``); None: what SRC records.
        iteration: which iteration of SRC; None: the tracker's.

    Returns:
        The validated growth (every rank calls it; it reads only metadata).

    Raises:
        GrowthError, CheckpointError, ConfigError: one line naming the problem.
    """
    optimizer_state.check_carry_recipe(growth)
    ckpt_dir, it = paths.resolve_checkpoint_dir(source_path, iteration)
    storage = io.read_storage_metadata(ckpt_dir)
    io.check_shard_files(ckpt_dir, storage)
    optimizer_state.check_carry_source(growth, ckpt_dir, storage)  # carry needs model-space optimizer state
    io.read_common_state(ckpt_dir)  # a damaged common.pt: one line now, not a traceback mid-load
    # The architecture: source_model (--source-config), else megatron_grow.json, else Megatron-LM args.
    info = read_checkpoint_info(ckpt_dir, it, source_config=source_model)
    if info.model is None:
        info.model = resolve_architecture(ckpt_dir)[0]  # raises, saying what to pass
    plan = make_growth_plan(info.model, growth)
    _check_source_shapes(plan.source, storage, ckpt_dir)
    return GrowthSource(source_path, info, plan, _source_spec(storage, ckpt_dir), storage)


def _source_spec(storage, ckpt_dir: str) -> str:
    stored = storage.state_dict_metadata.keys()
    if keys.has_singleton_expert_keys(stored):
        raise GrowthError(f"{ckpt_dir} stores one tensor per expert (MCore's singleton_local_shards format); "
                          "re-save it with stacked experts (Megatron-LM's default) to grow it")
    return keys.storage_spec(stored) or keys.LOCAL_SPEC


def _attention_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """One layer's stored attention projections' shapes (``checkpoint.keys`` suffixes), GQA or multi-latent."""
    H, n = model.hidden_size, model.num_attention_heads
    if not model.multi_latent_attention:
        q, kv = n * model.kv_channels, model.num_query_groups * model.kv_channels
        return {keys.QKV_SUFFIX: (q + 2 * kv, H), keys.PROJ_SUFFIX: (H, q)}
    qk = n * (model.qk_head_dim + model.qk_pos_emb_head_dim)
    r_q, r_kv = model.q_lora_rank, model.kv_lora_rank

    def suffix(key: str) -> str:
        return key[len(keys.LAYER_PREFIX):]

    query = ({suffix(keys.MLA_Q_DOWN): (r_q, H), suffix(keys.MLA_Q_UP): (qk, r_q)} if r_q
             else {suffix(keys.MLA_Q_PROJ): (qk, H)})
    return {**query, suffix(keys.MLA_KV_DOWN): (r_kv + model.qk_pos_emb_head_dim, H),
            suffix(keys.MLA_KV_UP): (n * (model.qk_head_dim + model.v_head_dim), r_kv),
            keys.PROJ_SUFFIX: (H, n * model.v_head_dim)}


def _expected_layer_shapes(model: ModelConfig) -> dict[str, tuple]:
    """Storage key -> global shape of the main per-layer tensors: stacked over layers for an all-MoE
    stack, one key per layer for a mixed one (``keys.per_layer_storage_key``)."""
    E, H, F = model.num_moe_experts, model.hidden_size, model.moe_ffn_hidden_size
    glu = 2 if model.gated_linear_unit else 1
    Fd = model.ffn_hidden_size or F
    moe = {keys.ROUTER_SUFFIX: (E, H), keys.EXPERT_FC1_SUFFIX: (E, glu * F, H), keys.EXPERT_FC2_SUFFIX: (E, H, F)}
    if model.moe_router_enable_expert_bias:
        moe[keys.EXPERT_BIAS_SUFFIX] = (E,)
    attention = _attention_shapes(model)
    if not is_mixed_stack(model):
        return {keys.LAYER_PREFIX + k: (model.num_layers,) + v for k, v in (attention | moe).items()}
    dense = {keys.DENSE_FC1_SUFFIX: (glu * Fd, H), keys.DENSE_FC2_SUFFIX: (H, Fd)}
    return {keys.per_layer_storage_key(i, k): v for i, is_moe in enumerate(moe_layer_pattern(model))
            for k, v in (attention | (moe if is_moe else dense)).items()}


def _check_source_shapes(model: ModelConfig, storage, ckpt_dir: str) -> None:
    """The source architecture must agree with the stored tensors: name the tensor and both shapes."""
    H = model.hidden_size
    expected = _expected_layer_shapes(model)
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


@torch.no_grad()
def load_grown_weights(model_chunks: Sequence[torch.nn.Module], source: GrowthSource,
                       progress: bool = True) -> LoadStats:
    """Fill ``model_chunks`` (this rank's part of the grown model) from the source checkpoint (collective).

    The algorithm: rewrite the target's sharded tensors into source read requests; check them
    against the source metadata; NaN-fill the model; read the expert statistics the noise needs
    (collective); then, one source layer at a time, read its requests (this rank alone) and write
    every target slice grown from it; finally prove that no parameter was left unfilled.

    Args:
        model_chunks: this rank's chunks of the grown model, built in the target layout.
        source: the prepared growth (``prepare_growth``).
        progress: log one line per source layer group.

    Returns:
        What was read and how long it took.
    """
    stats = LoadStats()
    t0 = time.perf_counter()
    tasks, requests, expert_std = plan_reads(target_sharded_tensors(model_chunks), model_chunks, source, stats)
    poison_parameters(model_chunks)
    order, groups = layer_groups(tasks)
    for r, name in enumerate(order):
        _load_group(r, len(order), name, groups[name], requests, source, expert_std, stats, progress)
    verify_all_sourced(model_chunks)
    stats.seconds = time.perf_counter() - t0
    return stats


def plan_reads(targets: list, model_chunks, source: GrowthSource, stats: LoadStats,
               keep_regions: bool = False) -> tuple:
    """Tasks and read requests for ``targets``, checked against SRC's metadata, and the noise
    statistics (collective: every rank calls it).

    Args:
        targets: this rank's sharded tensors of the grown model (after ``apply_factories``).
        model_chunks: the grown model's chunks (their config is checked against the plan's target).
        source: the prepared growth.
        stats: receives the statistics pass's time.
        keep_regions: also return the source regions the statistics pass read that this rank writes from.

    Returns:
        (tasks, deduplicated source requests by id, noise std per (logical key, source layer, source
        expert)[, kept regions by request id, in the stored dtype]).
    """
    plan = source.plan
    _check_target_model(model_chunks, plan.target)
    built = keys.built_spec(built_with_te(model_chunks))
    tasks, requests = retarget.build_tasks(targets, plan,
                                           lambda key: keys.spec_storage_key(key, built, source.source_spec))
    # The source must hold every tensor the target asks for, with the global shape we expect.
    io.check_against_checkpoint({"r": list(requests.values())}, source.ckpt_dir, source.storage)
    ts = time.perf_counter()
    # Kept: the full source experts this rank writes from, read once for the statistics and the copies.
    wanted = {t.request_id: requests[t.request_id] for t in tasks if is_main_replica(t.target.replica_id)}
    expert_std, kept = expert_stats(tasks, plan, source.reader, wanted if keep_regions else None)
    stats.stats_seconds = time.perf_counter() - ts
    if keep_regions:
        return tasks, requests, expert_std, kept
    return tasks, requests, expert_std


def _load_group(r: int, rounds: int, name, group_tasks: list, requests: dict, source: GrowthSource,
                expert_std: dict, stats: LoadStats, progress: bool) -> None:
    """Read one source layer's requests, write the target slices grown from it."""
    group_requests = {t.request_id: requests[t.request_id] for t in group_tasks}
    tg = time.perf_counter()
    read_requests(group_requests, source.reader)
    for t in group_tasks:
        value = retarget.grown_slice(t, requests[t.request_id].data, source.plan, expert_std)
        t.target.data.copy_(value.to(t.target.data.dtype))
    nbytes = sum(st.data.numel() * st.data.element_size() for st in group_requests.values())
    for st in group_requests.values():
        st.data = torch.empty(0, dtype=st.data.dtype)  # free the buffer; peak stays ~ one group
    seconds = time.perf_counter() - tg
    stats.bytes_read += nbytes
    stats.tensors += len(group_tasks)
    stats.groups += 1
    stats.per_group.append((name, nbytes, seconds))
    if progress:
        if name == ("other", 0):
            label = "embedding, output layer, final norm"
        else:
            label = f"source layer {name[1]} -> target layers {sorted({t.target_layer for t in group_tasks})}"
        log(f"group {r + 1}/{rounds}: {label}: {len(group_tasks)} tensors, {nbytes / 2**20:.1f} MiB "
            f"in {seconds:.2f}s")


def _check_target_model(model_chunks, target: ModelConfig) -> None:
    cfg = model_chunks[0].config
    for name in ("num_layers", "num_moe_experts", "moe_router_topk", "hidden_size", "moe_ffn_hidden_size"):
        if getattr(cfg, name) != getattr(target, name):
            raise GrowthError(f"the model being filled has {name}={getattr(cfg, name)}, but the growth plan's "
                              f"target needs {getattr(target, name)}")


# ------------------------------------------------------------------------------------------------
# The growth record and the offline command


def growth_record(source: GrowthSource, params_before: int, params_after: int, seconds: float) -> dict:
    """The lineage entry of this growth (appended to the grown checkpoint's manifest).

    Args:
        source: the prepared growth.
        params_before: the source model's parameter count.
        params_after: the grown model's parameter count.
        seconds: how long the growth took.

    Returns:
        A JSON-able dict: the operators in order, every operator section (None when off), seed,
        optimizer, the source's path, iteration, model and FLOPs, the sizes, the time.
    """
    g = source.plan.growth
    sections = {name: dataclasses.asdict(s) if (s := getattr(g, name)) is not None else None
                for name in g.operator_names()}
    return {
        "operators": list(source.plan.order),
        **sections,
        "seed": g.seed,
        "optimizer": g.optimizer,
        "optimizer_policy": dataclasses.asdict(g.optimizer_policy) if g.optimizer_policy is not None else None,
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
    """Counters a resumed run needs: position and FLOPs carry over; all of it is now sunk cost.

    Args:
        source: the prepared growth.

    Returns:
        The source's counters with ``sunk_flops`` set to its ``flops_so_far``.
    """
    c = dict(source.info.counters)
    c["sunk_flops"] = c.get("flops_so_far", 0)
    return c


def grow_load_into(model_chunks, source: GrowthSource, started: float, progress: bool = True) -> GrownStart:
    """Online growth (collective): fill ``model_chunks`` and say where the grown model starts.

    Args:
        model_chunks: this rank's chunks of the grown model (built in the run's layout).
        source: the prepared growth (``prepare_growth``).
        started: ``time.perf_counter()`` when the growth began (for the growth record).
        progress: log one line per source layer group.

    Returns:
        The counters and lineage the grown model carries (what the trainer's first checkpoint
        records), without an optimizer loader (the caller adds one for ``growth.optimizer: carry``).
    """
    load_grown_weights(model_chunks, source, progress=progress)
    before, after = count_params(source.plan.source).total, count_params(source.plan.target).total
    record = io.broadcast_object(growth_record(source, before, after, time.perf_counter() - started))
    return GrownStart(counters=grown_counters(source), lineage=tuple(source.info.lineage) + (record,))


def prepare_destination(save: str, overwrite: bool, source_root: str) -> None:
    """Everything about --save that can go wrong, found before anything is read or written.

    The source is never modified: --save may not be the source, lie inside it or contain it
    (paths compared after resolving links). A non-empty --save needs --overwrite, and then it
    is replaced only once the new checkpoint is complete (``io.save_checkpoint_replacing``).

    Args:
        save: DST.
        overwrite: whether a non-empty DST may be replaced.
        source_root: SRC as given (``--load``).

    Raises:
        GrowthError: one line naming the problem.
    """
    paths.check_destination(save, "--save", [("the source checkpoint", source_root)], GrowthError)
    if os.path.lexists(save) and not os.path.isdir(save):
        raise GrowthError(f"--save {save} exists and is not a directory")
    if os.path.isdir(save) and os.listdir(save) and not overwrite:
        raise GrowthError(f"--save {save} exists and is not empty; pass --overwrite to replace it")
    paths.probe_writable(save, "--save")


def grow_checkpoint(load: str, save: str, growth: GrowthConfig, parallel: ParallelConfig, *,
                    source_model: ModelConfig | None = None, recipe_dict: dict | None = None,
                    overwrite: bool = False, seed: int = 1234, progress: bool = True,
                    target_spec: str | None = None, expert_backend: str | None = None,
                    check_staged: Callable[[str], None] | None = None, dtype: str = "auto") -> dict:
    """Offline growth (collective): grow SRC into DST in the layout ``parallel`` (module docstring).

    The target is built on the meta device and saved atomically, each grown tensor computed from
    its source region while the writer writes (``growth.streamed``), the growth appended to the lineage.

    Args:
        load, save: SRC and DST.
        growth, parallel: the operators; the grown model's layout.
        source_model: SRC's architecture; None: what SRC records.
        recipe_dict, seed: recorded in the manifest; the process-group seed.
        overwrite, progress: replace a non-empty DST; log progress.
        target_spec: the layer spec whose names DST uses; None: the spec this machine builds.
        expert_backend: the target's ``model.moe_expert_backend`` (how it runs, not what it stores).
        check_staged: collective (the CLI's verify); runs on the complete grown run directory before
            it replaces ``save``: if it raises, ``save`` is left as it was.
        dtype: the grown weights' dtype (``OUTPUT_DTYPES``): ``auto`` = what SRC stores its weights in.

    Returns:
        A summary dict (rank 0's numbers), for ``print_summary``.
    """
    t0 = time.perf_counter()
    prepare_destination(save, overwrite, load)
    source = prepare_growth(load, growth, source_model)
    check_target_layout(source.plan.target, parallel)
    ctx = initialize_distributed(parallel, seed=seed)
    _log_start(source, ctx)
    built = (dataclasses.replace(source.plan.target, moe_expert_backend=expert_backend) if expert_backend
             else source.plan.target)
    stats = LoadStats()
    params_dtype = output_dtype(dtype, source.storage)
    state, targets, grown, built_spec = streaming_target(source, built, parallel, stats, progress,
                                                         params_dtype=params_dtype)
    # growth.optimizer: carry: Adam state grown through the same maps (growth/optimizer_state.py).
    carried = (optimizer_state.grown_optimizer_checkpoint_state(targets, source, progress)
               if optimizer_state.carries(growth) else {})
    before, after = count_params(source.plan.source).total, count_params(source.plan.target).total
    record = growth_record(source, before, after, time.perf_counter() - t0)
    ts = time.perf_counter()
    final = _save_grown(state, grown, source, record, save, parallel, ctx, recipe_dict=recipe_dict,
                        built_spec=built_spec, target_spec=target_spec or built_spec, carried_optimizer=carried,
                        check_staged=check_staged)
    summary = _summary(source, final, grown, stats, ctx, t0, time.perf_counter() - ts)
    summary["dtype"] = str(params_dtype).replace("torch.", "")
    return summary


def output_dtype(dtype: str, storage) -> torch.dtype:
    """The grown weights' dtype for ``grow --dtype``: ``fp32``, ``bf16``, or ``auto``: the dtype SRC stores
    its routed experts' fc1 in (its weights' dtype; a Megatron-LM bf16 run stores bf16 weights and keeps
    the fp32 main copy in the optimizer state). Buffers MCore keeps in fp32 (the router's expert bias)
    stay fp32 whatever the choice, as in a training run with that params dtype."""
    if dtype not in OUTPUT_DTYPES:
        raise GrowthError(f"--dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    if dtype != "auto":
        return OUTPUT_DTYPES[dtype]
    stored = storage.state_dict_metadata.get(keys.EXPERT_FC1)
    if isinstance(stored, TensorStorageMetadata) and stored.properties.dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def streaming_target(source: GrowthSource, built: ModelConfig, parallel: ParallelConfig, stats: LoadStats,
                     progress: bool = True, compute=retarget.grown_slice,
                     params_dtype: torch.dtype = torch.float32) -> tuple[dict, list, GrownTensors, str]:
    """This rank's grown model on the meta device, as the streaming save sees it: its sharded state dict,
    its sharded tensors (lazy), the producer of their values and the spec whose names the built chunks
    hold (``keys.built_spec``: local for ``grouped_mm`` experts even with TE installed). Also the growth
    rehearsal's entry (``growth.rehearsal``: ``source.reader`` reads no data there, ``compute`` computes none)."""
    # every weight comes from SRC, streamed; ``params_dtype`` is the dtype DST stores them in
    chunks = build_model_chunks(built, parallel, meta=True, params_dtype=params_dtype)
    state = io.model_sharded_state_dict(chunks)
    apply_factories(state)  # the sharded tensors the tasks fill are the ones the writer saves
    targets = list(io.iter_sharded_tensors(state))
    for st in targets:  # buffers MCore creates on an explicit device (expert_bias) are grown too
        st.data = st.data.to("meta")
    # Each rank writes the copies of the source experts it reads (any rank may write any chunk).
    retarget.assign_expert_writers(targets, source.plan, parallel.expert_model_parallel_size)
    tasks, requests, expert_std, kept = plan_reads(targets, chunks, source, stats, keep_regions=True)
    grown = GrownTensors(tasks, requests, source.plan, source.reader, expert_std, progress, compute=compute,
                         preloaded=kept)
    return state, targets, grown, keys.built_spec(built_with_te(chunks))


def _summary(source: GrowthSource, final: str, grown: GrownTensors, stats: LoadStats, ctx, t0: float,
             save_seconds: float) -> dict:
    before, after = count_params(source.plan.source).total, count_params(source.plan.target).total
    total = time.perf_counter() - t0
    bytes_written = io.checkpoint_bytes(final) if rank() == 0 else 0
    # Every read of SRC this rank made (statistics pass, regions written, optimizer state), in stored bytes.
    totals = torch.tensor([source.reader.bytes_read, source.reader.bytes_received], dtype=torch.float64)
    if torch.distributed.is_initialized():
        all_reduce_host(totals)
    return {
        "source": source.ckpt_dir, "grown": final, "iteration": source.info.counters["iteration"],
        "source_model": source.plan.source, "source_spec": source.source_spec,
        "params_before": before, "params_after": after,
        "bytes_read": int(totals[0].item()), "bytes_received": int(totals[1].item()), "bytes_written": bytes_written,
        # load: reading and growing inside the save, summed over the writer threads of rank 0
        "load_seconds": grown.seconds, "stats_seconds": stats.stats_seconds, "save_seconds": save_seconds,
        "seconds": total, "world_size": ctx.world_size,
        "throughput_gib_s": (bytes_written / 2**30) / total if total > 0 else 0.0,
        # This rank's own I/O and streaming buffers, as the growth rehearsal predicts them.
        "rank_io": {"bytes_read": source.reader.bytes_read, "bytes_received": source.reader.bytes_received,
                    "bytes_produced": grown.bytes_produced,
                    "peak_held_bytes": grown.peak_held_bytes},
    }


def check_target_layout(target: ModelConfig, parallel: ParallelConfig) -> None:
    """The layout must fit the *grown* model. Checked before initialize_distributed, whose world-size
    check would otherwise hide the real problem (16 grown experts on EP=3 reported as "world size 1 is
    not divisible by 3").

    Args:
        target: the grown model.
        parallel: the target layout.

    Raises:
        GrowthError: naming every problem.
    """
    problems = model_layout_problems(target, parallel)
    if problems:
        raise GrowthError("target layout does not fit the grown model: " + "; ".join(problems))


def _log_start(source: GrowthSource, ctx) -> None:
    plan = source.plan
    log(f"source {source.ckpt_dir} (iteration {source.info.iteration}, {source.source_spec} names); "
        f"{' then '.join(plan.order)}: layers {plan.source.num_layers} -> {plan.target.num_layers}, "
        f"experts {plan.source.num_moe_experts} -> {plan.target.num_moe_experts}, "
        f"top-k {plan.source.moe_router_topk} -> {plan.target.moe_router_topk}; target layout "
        f"TP={ctx.layout.tp} PP={ctx.layout.pp} EP={ctx.layout.ep} DP={ctx.layout.dp}")


def _save_grown(state: dict, grown: GrownTensors, source: GrowthSource, record: dict, save: str,
                parallel: ParallelConfig, ctx, *, recipe_dict: dict | None, built_spec: str, target_spec: str,
                carried_optimizer: dict, check_staged: Callable[[str], None] | None = None) -> str:
    """Write the grown model (weights produced by ``grown`` while they are written, Megatron-LM's
    common state, our manifest) atomically."""
    if target_spec not in keys.SPECS:
        raise GrowthError(f"--target-spec {target_spec!r} is not one of {', '.join(keys.SPECS)}")
    counters = grown_counters(source)
    manifest = build_manifest(model=source.plan.target, recipe=recipe_dict,
                              layout=ctx.layout.as_record(),
                              counters=counters, lineage=source.info.lineage + [record])
    manifest["layer_spec"] = target_spec
    manifest = io.broadcast_object(manifest)  # the common state must be identical on every rank
    keys.rename_for_spec(state, built_spec, target_spec)
    state.update(carried_optimizer)
    args = megatron_args(source.plan.target, parallel, counters=counters, world_size=ctx.world_size,
                         base=load_common_state(source.ckpt_dir).get("args"))
    state.update(common_state(counters, manifest, args))
    # Written beside --save, checked there, then swapped in: an old --save (with --overwrite) goes only after.
    return io.save_checkpoint_replacing(save, counters["iteration"], state, manifest, produce=grown,
                                        check=check_staged)


def print_summary(summary: dict, file=sys.stdout) -> None:
    """Print ``grow_checkpoint``'s summary as an aligned table.

    Args:
        summary: ``grow_checkpoint``'s return value.
        file: where to print.
    """
    rows = [
        ("source", summary["source"]), ("grown checkpoint", summary["grown"]),
        ("iteration", summary["iteration"]),
        ("parameters", f"{summary['params_before']:,} -> {summary['params_after']:,} "
                       f"({summary['params_after'] / max(summary['params_before'], 1):.2f}x)"),
        ("bytes read (all ranks)", f"{summary['bytes_read'] / 2**20:,.1f} MiB"
                                   + (f" (and {summary['bytes_received'] / 2**20:,.1f} MiB of it sent between ranks)"
                                      if summary.get("bytes_received") else "")),
        ("bytes written", f"{summary['bytes_written'] / 2**20:,.1f} MiB ({summary.get('dtype', '?')} weights)"),
        ("ranks", summary["world_size"]),
        ("time", f"{summary['seconds']:.2f}s (stats {summary['stats_seconds']:.2f}s, load "
                 f"{summary['load_seconds']:.2f}s, save {summary['save_seconds']:.2f}s; the save reads and "
                 "grows each tensor as it writes it, load = that part summed over writer threads)"),
        ("throughput", f"{summary['throughput_gib_s'] * 1024:.1f} MiB/s written"),
    ]
    width = max(len(r[0]) for r in rows)
    print("grow summary", file=file)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=file)
