"""Rehearse an offline growth at full size, with no tensor data: every rank of the real streaming grow.

``megatron-grow grow`` on a 17B -> 35B or 35B -> 70B checkpoint runs on a cluster; this module
answers beforehand, on one CPU machine, what each rank of it reads, writes and holds. It runs the
*same code* as :func:`growth.grow.grow_checkpoint`, rank after rank in one process
(``parallel.simulated``: torch's fake process group under Megatron-Core's real parallel state):

* the source checkpoint's layout: the source model built on ``meta`` at its own layout on every
  source rank, its sharded state dict turned into DCP write plans (``checkpoint.streaming``'s
  ``streaming_save_plan``) and merged by DCP's coordinator step into the checkpoint ``Metadata``
  (the ``.metadata`` file that layout's save would write: every stored chunk);
* per target rank: the grown model built on ``meta`` and its read tasks (``grow.streaming_target``:
  the real ``plan_reads``, including the expert-statistics pass), read through a
  :class:`MetadataReader` (the real ``CheckpointReader.read``: DCP's overlap matching against the
  stored chunks, its coverage check; no bytes move), the real producing planner's local plan,
  DCP's global plan over all ranks, then the writer's real per-thread split
  (``_split_by_size_and_type``) with every item resolved through the real ``GrownTensors`` (reads,
  releases, the held-bytes account) in thread lockstep; ``compute`` returns an empty meta slice.

What it reports per rank: bytes requested (what ``CheckpointReader.bytes_read`` counts), bytes
fetched from storage (whole stored chunks: DCP deserialises each overlapping chunk whole), bytes
written, and the peak of ``GrownTensors.held_bytes``; over all ranks: every target tensor tiled
exactly once by the written chunks, reads inside stored chunks (else ``read`` raises), totals and
the predicted wall time at a filesystem bandwidth per node.

Exactness: bytes are exact. The peak is exact with one writer thread; with several, the real
threads interleave by timing and the lockstep order is an estimate (docs/scale.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed._shard.sharded_tensor.api as sharded_tensor_api
import torch.distributed._shard.sharding_spec.api as sharding_spec_api
import torch.distributed.checkpoint.default_planner as default_planner
from torch.distributed.checkpoint.filesystem import _split_by_size_and_type
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType

from megatron_grow.checkpoint import io, keys
from megatron_grow.checkpoint.manifest import CheckpointInfo
from megatron_grow.checkpoint.reader import CheckpointReader, StoredTensor
from megatron_grow.checkpoint.streaming import DEFAULT_WRITER_THREADS, local_problem, streaming_save_plan
from megatron_grow.config.schema import GrowthConfig, ModelConfig, ParallelConfig
from megatron_grow.errors import GrowthError
from megatron_grow.growth.grow import GrowthSource, LoadStats, check_target_layout, output_dtype, streaming_target
from megatron_grow.growth.plan import make_growth_plan
from megatron_grow.models.builder import build_model_chunks
from megatron_grow.models.specs import te_available
from megatron_grow.parallel.simulated import simulated_rank

LABEL = "<rehearsal>"


class MetadataReader(CheckpointReader):
    """``CheckpointReader`` over a checkpoint's DCP ``Metadata`` alone: regions are planned exactly as a
    real read plans them, allocated on ``meta``, and counted instead of read."""

    buffer_device = "meta"

    def __init__(self, metadata: Metadata, label: str = LABEL):  # no directory behind it: no super().__init__
        self.ckpt_dir, self.iteration, self.metadata, self.progress = label, 0, metadata, None
        self.tensors = {k: StoredTensor(k, tuple(md.size), md.properties.dtype, len(md.chunks))
                        for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
        self.bytes_read = 0
        self.storage_bytes = 0  # whole stored chunks touched (what FileSystemReader deserialises)
        self.reads = 0
        self._chunks_by_row: dict = {}

    def _read_items(self, key: str, items: list, buffer: torch.Tensor) -> None:
        for item in items:
            numel = _stored_chunk_numel(self, key, tuple(item.storage_index.offset))
            self.storage_bytes += numel * buffer.element_size()
        self.reads += 1


def _stored_chunk_numel(reader: MetadataReader, key: str, offset: tuple) -> int:
    rows = reader._chunks_by_row.get(key)
    candidates = rows.get(offset[0], []) if rows and offset else reader.metadata.state_dict_metadata[key].chunks
    for c in candidates:
        if tuple(c.offsets) == offset:
            return math.prod(c.sizes)
    raise GrowthError(f"{key}: no stored chunk at {offset}")


def _meta_slice(task, source: torch.Tensor, plan, expert_std) -> torch.Tensor:
    """The rehearsal's ``compute``: a grown slice's shape and dtype, no values."""
    return torch.empty(task.target.local_shape, dtype=task.target.dtype, device="meta")


@dataclass
class RankIO:
    """One rank's figures (bytes; ``peak_held_bytes``: ``GrownTensors.peak_held_bytes``)."""

    rank: int
    node: int
    bytes_requested: int = 0
    bytes_from_storage: int = 0
    bytes_written: int = 0         # tensors and objects, as the writer serialises them (payload)
    object_bytes_written: int = 0  # of which pickled objects (ShardedObjects: extra state)
    reads: int = 0
    write_items: int = 0
    peak_held_bytes: int = 0
    # For growth.optimizer: carry (three fp32 states per parameter element, see Rehearsal.carry):
    local_numel: int = 0      # elements of this rank's target tensors, replicas included
    requested_numel: int = 0  # elements of this rank's weight read requests (the statistics pass excluded)
    written_numel: int = 0    # elements of the tensors this rank writes (main replicas)


@dataclass
class Rehearsal:
    """A rehearsed growth: per-rank figures and the checks over all ranks."""

    source_world: int
    target_world: int
    source_bytes: int
    target_bytes: int
    writer_threads: int
    ranks: list[RankIO] = field(default_factory=list)
    tensors_tiled: int = 0
    seconds: float = 0.0

    def node_bytes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.ranks:
            out[r.node] = out.get(r.node, 0) + r.bytes_from_storage + r.bytes_written
        return out

    def carry(self) -> dict:
        """What ``growth.optimizer: carry`` adds, per rank at most, derived from these figures (not run
        through ``growth.optimizer_state``): three fp32 states (main param, exp_avg, exp_avg_sq) per
        element read through the weights' requests and written for the main replicas; and held in
        memory all at once, for every local element, replicas included (``fill_grown_optimizer_tensors``
        allocates the rank's whole optimizer state before the save: it is not streamed)."""
        per_rank = [(3 * 4 * r.requested_numel, 3 * 4 * r.written_numel, 3 * 4 * r.local_numel) for r in self.ranks]
        return {"bytes_read": sum(p[0] for p in per_rank), "bytes_written": sum(p[1] for p in per_rank),
                "max_rank_bytes_read": max(p[0] for p in per_rank),
                "max_rank_bytes_written": max(p[1] for p in per_rank),
                "max_rank_memory_bytes": max(p[2] for p in per_rank)}

    def summary(self, bandwidth_gib_s: float) -> dict:
        """Totals, the most loaded rank and node, and the predicted wall time at ``bandwidth_gib_s`` per node
        (the busiest node's bytes over its bandwidth: nodes read and write in parallel)."""
        read = sum(r.bytes_from_storage for r in self.ranks)
        busiest = max(self.ranks, key=lambda r: r.bytes_from_storage + r.bytes_written)
        peak = max(self.ranks, key=lambda r: r.peak_held_bytes)
        nodes = self.node_bytes()
        node = max(nodes, key=nodes.get)
        return {
            "source_world": self.source_world, "target_world": self.target_world,
            "source_bytes": self.source_bytes, "target_bytes": self.target_bytes,
            "bytes_requested": sum(r.bytes_requested for r in self.ranks), "bytes_read": read,
            "bytes_written": sum(r.bytes_written for r in self.ranks),
            "read_over_source": read / self.source_bytes if self.source_bytes else 0.0,
            "coverage": {"target_tensors_tiled_exactly_once": self.tensors_tiled, "reads_inside_source": True},
            "busiest_rank": dataclasses.asdict(busiest), "peak_held_rank": dataclasses.asdict(peak),
            "busiest_node": {"node": node, "bytes": nodes[node]},
            "bandwidth_gib_s_per_node": bandwidth_gib_s,
            "predicted_seconds": nodes[node] / (bandwidth_gib_s * 2**30),
            "writer_threads": self.writer_threads, "rehearsal_seconds": round(self.seconds, 1),
        }


@contextlib.contextmanager
def linear_overlap_checks():
    """Inside: torch's pairwise shard-overlap validations are skipped, and :func:`tiling_problems` (linear
    in the chunks) checks the whole checkpoint instead, once.

    Why: ``ShardedTensor`` metadata validation and DCP's ``_validate_global_plan`` compare every pair
    of chunks of a tensor: 5,376 chunks per expert tensor at 35B is 14M pairs per tensor, per rank
    (~20 s per rank at 17B on this CPU). They only validate; the plans they check are unchanged."""
    saved = (sharding_spec_api.validate_non_overlapping_shards_metadata,
             sharded_tensor_api.validate_non_overlapping_shards_metadata, default_planner._validate_global_plan)
    sharding_spec_api.validate_non_overlapping_shards_metadata = lambda shards: None
    sharded_tensor_api.validate_non_overlapping_shards_metadata = lambda shards: None
    default_planner._validate_global_plan = lambda plans, metadata: []
    try:
        yield
    finally:
        (sharding_spec_api.validate_non_overlapping_shards_metadata,
         sharded_tensor_api.validate_non_overlapping_shards_metadata, default_planner._validate_global_plan) = saved


# ------------------------------------------------------------------------------------------------
# The checkpoint a layout writes, and the growth into another layout


def simulated_metadata(model: ModelConfig, parallel: ParallelConfig, world_size: int,
                       params_dtype: torch.dtype = torch.float32) -> tuple[Metadata, list]:
    """The DCP ``Metadata`` a checkpoint of ``model`` saved under ``parallel`` on ``world_size`` ranks has,
    and each rank's local write plan: the model built on meta on every rank, planned as a save plans it.
    ``params_dtype``: the weights' dtype in the run that saved it (bf16 for a bf16 run on GPUs)."""
    planners, plans = [], []
    for r in range(world_size):
        with simulated_rank(parallel, r, world_size):
            chunks = build_model_chunks(model, parallel, meta=True, params_dtype=params_dtype)
            state = io.model_sharded_state_dict(chunks)
            _, pyt_state_dict, planner, _ = streaming_save_plan(state, None)
            planner.set_up_planner(pyt_state_dict, storage_meta=None, is_coordinator=r == 0)
            plans.append(planner.create_local_plan())
            planners.append(planner if r == 0 else None)
    global_plans, metadata = planners[0].create_global_plan(plans)
    return metadata, global_plans


def tensor_bytes(metadata: Metadata) -> int:
    return sum(math.prod(md.size) * md.properties.dtype.itemsize
               for md in metadata.state_dict_metadata.values() if isinstance(md, TensorStorageMetadata))


def tiling_problems(metadata: Metadata) -> list[str]:
    """Tensors whose stored chunks do not tile their global shape exactly once (a gap, an overlap or a
    chunk outside): checked on the grid of the chunks' own boundaries, linear in the chunks."""
    problems = [_tiling_problem(key, md) for key, md in metadata.state_dict_metadata.items()
                if isinstance(md, TensorStorageMetadata)]
    return [p for p in problems if p is not None]


def _tiling_problem(key: str, md: TensorStorageMetadata) -> str | None:
    for c in md.chunks:
        if any(o < 0 or o + n > size for o, n, size in zip(c.offsets, c.sizes, md.size)):
            return f"{key}: chunk at {tuple(c.offsets)} lies outside {tuple(md.size)}"
    cuts = [sorted({0, n} | {c.offsets[d] for c in md.chunks} | {c.offsets[d] + c.sizes[d] for c in md.chunks})
            for d, n in enumerate(md.size)]
    index = [{cut: i for i, cut in enumerate(dim_cuts)} for dim_cuts in cuts]
    cells = math.prod(len(c) - 1 for c in cuts)
    seen = 0
    covered: set = set()
    for c in md.chunks:
        spans = [range(ix[o], ix[o + n]) for ix, o, n in zip(index, c.offsets, c.sizes)]
        for cell in _cells(spans):
            seen += 1
            covered.add(cell)
    if seen != len(covered) or len(covered) != cells:
        return f"{key}: {cells} grid cells, {len(covered)} covered, {seen - len(covered)} twice"
    return None


def _cells(spans: list):
    if not spans:
        yield ()
        return
    for i in spans[0]:
        for rest in _cells(spans[1:]):
            yield (i,) + rest


@dataclass
class _StagedRank:
    """A target rank between its local plan and its writes (DCP's global plan needs every rank's)."""

    io: RankIO
    planner: object
    grown: object
    reader: MetadataReader
    lazy_count: int


def rehearse_growth(source_model: ModelConfig, growth: GrowthConfig, source_parallel: ParallelConfig,
                    source_world: int, target_parallel: ParallelConfig, target_world: int, *,
                    gpus_per_node: int = 8, threads: int | None = None, target_spec: str | None = None,
                    source_dtype: torch.dtype = torch.float32) -> Rehearsal:
    """Every rank of ``megatron-grow grow`` from ``source_model`` saved under ``source_parallel`` on
    ``source_world`` ranks into ``target_parallel`` on ``target_world`` ranks, with no data (module doc).
    ``source_dtype``: the source weights' stored dtype (``grow --dtype auto`` writes the grown weights in it).
    Raises on a layout that does not fit, a read outside the source's chunks, or a target tensor not
    tiled exactly once."""
    t0 = time.perf_counter()
    plan = make_growth_plan(source_model, growth)
    check_target_layout(plan.target, target_parallel)
    with linear_overlap_checks():
        metadata, _ = simulated_metadata(plan.source, source_parallel, source_world, source_dtype)
        out = _rehearse(plan, metadata, source_world, target_parallel, target_world, gpus_per_node,
                        threads or DEFAULT_WRITER_THREADS, target_spec or keys.built_spec(te_available()))
    out.seconds = time.perf_counter() - t0
    return out


def _rehearse(plan, metadata: Metadata, source_world: int, target_parallel: ParallelConfig,
              target_world: int, gpus_per_node: int, threads: int, target_spec: str) -> Rehearsal:
    problems = tiling_problems(metadata)
    if problems:
        raise GrowthError(f"the simulated source checkpoint does not tile its tensors: {'; '.join(problems[:5])}")
    staged = []
    for r in range(target_world):
        with simulated_rank(target_parallel, r, target_world):
            staged.append(_plan_rank(plan, metadata, target_parallel, r, r // gpus_per_node, target_spec))
    global_plans, target_metadata = staged[0].planner.create_global_plan(
        [s.planner.plan for s in staged])  # DCP's coordinator step, over every rank's local plan
    problems = tiling_problems(target_metadata)
    if problems:
        raise GrowthError(f"the grown checkpoint would not hold every tensor exactly once: {'; '.join(problems[:5])}")
    for s, global_plan in zip(staged, global_plans):
        _write_rank(s, global_plan, threads)
    tiled = sum(isinstance(md, TensorStorageMetadata) for md in target_metadata.state_dict_metadata.values())
    return Rehearsal(source_world, target_world, tensor_bytes(metadata), tensor_bytes(target_metadata), threads,
                     [s.io for s in staged], tensors_tiled=tiled)


def _plan_rank(plan, metadata: Metadata, parallel: ParallelConfig, rank: int, node: int,
               target_spec: str) -> _StagedRank:
    """One target rank up to its local write plan: the real ``streaming_target`` and streaming save plan."""
    reader = MetadataReader(metadata)
    info = CheckpointInfo(LABEL, 0, plan.source, {}, [], {}, {})
    source_spec = keys.storage_spec(metadata.state_dict_metadata.keys()) or keys.LOCAL_SPEC
    source = GrowthSource(LABEL, info, plan, source_spec, metadata, _reader=reader)
    state, targets, grown, _ = streaming_target(source, plan.target, parallel, LoadStats(), progress=False,
                                                compute=_meta_slice,
                                                params_dtype=output_dtype("auto", metadata))
    rank_io = RankIO(rank, node, local_numel=sum(math.prod(st.local_shape) for st in targets),
                     requested_numel=sum(math.prod(req.local_shape) for req in grown.requests.values()))
    keys.rename_for_spec(state, keys.built_spec(te_available()), target_spec)
    _, pyt_state_dict, planner, lazy_count = streaming_save_plan(state, grown)
    planner.set_up_planner(pyt_state_dict, storage_meta=None, is_coordinator=rank == 0)
    planner.create_local_plan()
    return _StagedRank(rank_io, planner, grown, reader, lazy_count)


def _write_rank(staged: _StagedRank, global_plan, threads: int) -> None:
    """The writer's per-thread item lists (DCP's own split), resolved in thread lockstep."""
    planner, grown = staged.planner, staged.grown
    final = planner.finish_plan(global_plan)
    # Each thread writes its bucket's objects first, then its tensors in bucket order (_write_files_from_queue).
    queues = [sorted(bucket, key=lambda w: w.type != WriteItemType.BYTE_IO)
              for bucket in _split_by_size_and_type(threads, final.items)]
    written = objects = 0
    for step in range(max((len(q) for q in queues), default=0)):
        for queue in queues:
            if step < len(queue):
                data = planner.resolve_data(queue[step])
                if queue[step].type == WriteItemType.BYTE_IO:
                    objects += len(data.getbuffer())
                else:
                    written += data.numel() * data.element_size()
                    staged.io.written_numel += data.numel()
    problem = local_problem(planner, staged.lazy_count, grown, LABEL)
    if problem is not None:
        raise problem
    rio = staged.io
    rio.bytes_requested, rio.bytes_from_storage, rio.reads = (staged.reader.bytes_read, staged.reader.storage_bytes,
                                                              staged.reader.reads)
    rio.bytes_written, rio.object_bytes_written = written + objects, objects
    rio.write_items, rio.peak_held_bytes = len(final.items), grown.peak_held_bytes
