"""Grown tensors computed on demand, for the streaming save of an offline growth.

``megatron-grow grow`` never materialises the grown model: the target is built on the meta
device (only its sharded state dict is needed, to know what to write), and the checkpoint
writer (``checkpoint.streaming``) asks :class:`GrownTensors` for each target slice just before
writing it. A slice is computed exactly as growth on load computes it (``retarget.grown_slice``
on the same read request), so the written tensors are the ones the in-memory path produced.

Each source region is read once however many target slices copy it (depth copies, width
copies): it is kept until the last slice that reads it on this rank has been produced, then
dropped, so memory holds the regions in flight, not the model.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import torch

from megatron_grow.errors import GrowthError
from megatron_grow.growth import retarget
from megatron_grow.growth.plan import GrowthPlan
from megatron_grow.growth.source_reads import read_requests
from megatron_grow.parallel.collectives import print_rank0

PROGRESS_STEPS = 10  # progress lines per rank-0 save


def is_main_replica(replica_id) -> bool:
    """Megatron-Core writes only main replicas (all replica coordinates 0)."""
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(r == 0 for r in ids)


class GrownTensors:
    """``produce(sharded_tensor)`` for the streaming save: the grown values of one target slice.

    Thread-safe (the writer calls it from several threads). ``bytes_read`` and ``seconds``
    (summed over threads) are reported in the grow summary. ``held_bytes`` is what this object
    holds right now: the source regions kept for later copies plus the slices being computed (a
    slice that is its region unchanged counts twice: an upper bound by one region);
    ``peak_held_bytes`` its maximum, ``bytes_produced`` the sum of the slices handed to the writer.
    ``compute`` grows one slice from its source region (the rehearsal, ``growth.rehearsal``, passes
    one that returns an empty meta tensor of the slice's shape). ``preloaded``: regions read already
    (by request id, stored dtype), held until their last slice is produced like any other.
    """

    def __init__(self, tasks: list, requests: dict, plan: GrowthPlan, reader, expert_std: dict,
                 progress: bool = True, compute: Callable = retarget.grown_slice, preloaded: dict | None = None):
        self.plan, self.reader, self.expert_std, self.requests = plan, reader, expert_std, requests
        self.compute = compute
        self.held_bytes = self.peak_held_bytes = self.bytes_produced = 0
        self.task_of = {id(t.target): t for t in tasks}
        # Only main replicas are written; a region read only for other replicas is never needed.
        self.users = Counter(t.request_id for t in tasks if is_main_replica(t.target.replica_id))
        self.total = sum(self.users.values())
        # Regions read already (the width statistics pass keeps what this rank writes from), in the stored
        # dtype; cast to the request's dtype at each use. A region no main replica uses is not kept.
        self.loaded: dict = {rid: v for rid, v in (preloaded or {}).items() if self.users[rid] > 0}
        self.read_locks: dict = {}
        self.lock = threading.Lock()
        self.bytes_read = 0
        self.seconds = 0.0
        self.produced = 0
        self.progress = progress
        self.started = time.perf_counter()
        self._hold(sum(v.numel() * v.element_size() for v in self.loaded.values()))

    def __call__(self, st) -> torch.Tensor:
        task = self.task_of.get(id(st))
        if task is None:
            raise GrowthError(f"{st.key} at {tuple(st.global_offset)}: no growth task produces this tensor")
        t0 = time.perf_counter()
        source = self._source(task.request_id)
        # Growth computes in the request's dtype (fp32 for a bf16 target: noise is added in fp32 and rounded
        # once). A copy, or an expert whose operators add in fp32 and round to their input's dtype, gives the
        # same bits from the stored dtype when that is the target's: then no fp32 round trip, and a region
        # copied unchanged is handed to the writer as it was read.
        if not (source.dtype == st.dtype and task.kind in retarget.STORED_DTYPE_KINDS):
            source = source.to(self.requests[task.request_id].dtype)
        value = self.compute(task, source, self.plan, self.expert_std).to(st.dtype)
        nbytes = value.numel() * value.element_size()
        self._hold(nbytes)
        self._release(task.request_id)
        with self.lock:
            self.seconds += time.perf_counter() - t0
            self.produced += 1
            self.bytes_produced += nbytes
            self.held_bytes -= nbytes  # handed to the writer
            done = self.produced
        self._log(done)
        return value

    def _source(self, request_id) -> torch.Tensor:
        with self.lock:
            read_lock = self.read_locks.setdefault(request_id, threading.Lock())
        with read_lock:  # two slices copying one region: the second waits for the first's read
            with self.lock:
                value = self.loaded.get(request_id)
            if value is None:
                request = self.requests[request_id]
                nbytes = read_requests({request_id: request}, self.reader, cast=False)
                value, request.data = request.data, None
                with self.lock:
                    self.loaded[request_id] = value
                    self.bytes_read += nbytes
                self._hold(value.numel() * value.element_size())
        return value  # in the stored dtype, like a preloaded region

    def _hold(self, nbytes: int) -> None:
        with self.lock:
            self.held_bytes += nbytes
            self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)

    def _release(self, request_id) -> None:
        with self.lock:
            self.users[request_id] -= 1
            if self.users[request_id] <= 0:
                value = self.loaded.pop(request_id, None)
                self.read_locks.pop(request_id, None)
                if value is not None:
                    self.held_bytes -= value.numel() * value.element_size()

    def _log(self, done: int) -> None:
        if not self.progress or self.total == 0:
            return
        step = max(1, self.total // PROGRESS_STEPS)
        if done % step == 0 or done == self.total:
            print_rank0(f"written {done}/{self.total} grown tensors of this rank "
                        f"({self.bytes_read / 2**20:.0f} MiB read) in {time.perf_counter() - self.started:.1f}s",
                        prefix="[grow] ")

    def check_complete(self) -> None:
        """Every main-replica slice of this rank was produced (the writer asked for each once)."""
        if self.produced != self.total:
            raise GrowthError(f"{self.total - self.produced} of {self.total} grown tensors of this rank were "
                              "never written")
