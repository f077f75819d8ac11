"""The growth rehearsal (``growth.rehearsal``) predicts what the real ``megatron-grow grow`` reads,
writes and holds, rank by rank.

A tiny MoE (4 layers, 8 experts) is saved under a source layout, grown depth x2 then width x2
(gaussian noise with the per-layer statistics pass, which reads every source expert once more)
by the real streaming grow on 1, 2, 4 and 8 gloo ranks (TP, PP, EP, ETP, VPP), each rank counting through the code the
real grow runs (``CheckpointReader.bytes_read``, ``GrownTensors.bytes_produced`` and
``peak_held_bytes``). The rehearsal of the same growth, all ranks simulated in one process with no
data, must give, per rank:

* bytes requested from the source: equal (both are sums of the same read regions);
* tensor bytes written: equal; the ``.distcp`` files are at least the rehearsal's payload and at
  most 2 KiB per written item more (torch's serialisation header of each item);
* peak held bytes: equal with one writer thread (one order of writes, the same in both). With
  two threads the real order depends on timing, so only the bytes are compared there (measured
  once: real 336 KiB vs 136 KiB in lockstep on rank 0, 128 vs 136 KiB on rank 1; docs/scale.md).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/distributed/test_rehearsal.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.growth.plan import make_growth_plan
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.rehearsal_bodies import (
    grow_counted,
    rehearse,
    rehearse_with_a_lost_chunk,
    rehearsed_target_bytes,
    save_source,
)

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # each case: a source save, a grow and a rehearsal in fresh processes

RECIPE = load_recipe("configs/growth/tiny_depth_width.yaml")
MODEL = dataclasses.replace(RECIPE.model, seq_length=32)
GROWTH = dataclasses.replace(RECIPE.growth, width=dataclasses.replace(RECIPE.growth.width,
                                                                      noise_granularity="per_layer"))
SOURCE = (2, ParallelConfig(expert_model_parallel_size=2))  # the source is stored in EP-sharded chunks
PER_ITEM_HEADER = 2048

CASES = {
    "1_rank": (1, ParallelConfig(), 1),
    "2_ranks_tp2": (2, ParallelConfig(tensor_model_parallel_size=2), 1),
    "2_ranks_ep2_two_threads": (2, ParallelConfig(expert_model_parallel_size=2), 2),
    "4_ranks_pp2_ep2": (4, ParallelConfig(pipeline_model_parallel_size=2, expert_model_parallel_size=2), 1),
    "8_ranks_tp2_pp2_ep2": (8, ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                              expert_model_parallel_size=2), 1),
    "8_ranks_tp2_etp1_pp2_vpp2_ep2": (8, ParallelConfig(tensor_model_parallel_size=2, expert_tensor_parallel_size=1,
                                                        pipeline_model_parallel_size=2,
                                                        virtual_pipeline_model_parallel_size=2,
                                                        expert_model_parallel_size=2), 1),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rehearsal_source") / "ckpt")
    run_in_processes(save_source, SOURCE[0], (root, MODEL, SOURCE[1]))
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_rehearsal_matches_the_real_grow(source, tmp_path, case):
    world, parallel, threads = CASES[case]
    real = run_in_processes(grow_counted, world, (source, str(tmp_path / "grown"), GROWTH, parallel, threads))
    predicted = run_in_processes(rehearse, 1, (MODEL, GROWTH, SOURCE[1], SOURCE[0], parallel, world, threads))[0]
    assert len(predicted) == world
    for rank, (got, want) in enumerate(zip(real, predicted)):
        assert got["bytes_read"] == want["bytes_requested"], f"rank {rank}: bytes read"
        payload = want["bytes_written"] - want["object_bytes_written"]
        assert got["bytes_produced"] == payload, f"rank {rank}: tensor bytes written"
        assert want["bytes_written"] <= got["file_bytes"] <= want["bytes_written"] + PER_ITEM_HEADER * want[
            "write_items"], f"rank {rank}: .distcp bytes {got['file_bytes']} vs payload {want['bytes_written']}"
        if threads == 1:
            assert got["peak_held_bytes"] == want["peak_held_bytes"], f"rank {rank}: peak held bytes"
    assert sum(r["bytes_read"] for r in real) > 0


def test_a_read_outside_the_source_chunks_is_caught():
    """Coverage of the reads: with one stored expert chunk missing from the source, the rehearsal fails,
    naming the tensor."""
    error = run_in_processes(rehearse_with_a_lost_chunk, 1, (MODEL, GROWTH, SOURCE[1], SOURCE[0],
                                                             ParallelConfig(expert_model_parallel_size=2), 2))[0]
    assert error is not None and "linear_fc1.weight" in error and "covered" in error


def test_plan_prints_the_rehearsal_of_a_growth_recipe():
    """``megatron-grow plan`` on a growth recipe: the rehearsal in the table and in ``--json``."""
    base = [sys.executable, "-m", "megatron_grow", "plan", "--config", "configs/growth/tiny_depth_width.yaml",
            "--nodes", "1", "--gpus-per-node", "2", "parallel.expert_model_parallel_size=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    table = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-2000:]
    assert "growth rehearsal" in table.stdout and "tiled exactly once" in table.stdout
    plan = json.loads(subprocess.run(base + ["--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                                     timeout=300, check=True).stdout)
    rehearsal = plan["rehearsal"]
    assert [r["rank"] for r in rehearsal["ranks"]] == [0, 1]
    assert rehearsal["coverage"]["target_tensors_tiled_exactly_once"] == 13
    assert rehearsal["bytes_written"] == sum(r["bytes_written"] for r in rehearsal["ranks"])
    assert rehearsal["target_bytes"] <= rehearsal["bytes_written"]  # tensors plus pickled extra state


def test_rehearsal_predicts_the_source_dtype_for_the_grown_checkpoint():
    """``grow --dtype auto`` writes a bf16 source's grown weights in bf16 (the router's expert bias stays
    fp32): the rehearsal's grown bytes follow. From the fp32 prediction ``4 (P + B)`` (P weight elements,
    B = layers x experts bias elements of the grown model), the bf16 one must be ``2 P + 4 B``."""
    fp32, bf16 = run_in_processes(rehearsed_target_bytes, 1, (MODEL, GROWTH, ParallelConfig(), 1,
                                                               [torch.float32, torch.bfloat16]))[0]
    target = make_growth_plan(MODEL, GROWTH).target
    bias = target.num_layers * target.num_moe_experts
    weights = fp32 // 4 - bias
    assert bf16 == 2 * weights + 4 * bias, (fp32, bf16)


def _dcp_metadata(ckpt_root) -> object:
    """The DCP ``Metadata`` of a run root's last ``iter_N`` directory."""
    from torch.distributed.checkpoint import FileSystemReader

    it_dir = sorted(p for p in Path(ckpt_root).iterdir() if p.name.startswith("iter_"))[-1]
    return FileSystemReader(str(it_dir)).read_metadata()


def _expert_writers(ckpt_root: Path, key: str) -> dict:
    """(layer, expert) -> the ``.distcp`` file holding that chunk of ``key``, from the DCP metadata."""
    return {tuple(index.offset[:2]): info.relative_path for index, info in _dcp_metadata(ckpt_root).storage_data.items()
            if index.fqn == key}


def _stored_tensor_bytes(ckpt_root: str) -> int:
    """The source's tensor bytes, from its DCP metadata (what reading every stored tensor once costs)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return sum(torch.Size(m.size).numel() * m.properties.dtype.itemsize
               for m in _dcp_metadata(ckpt_root).state_dict_metadata.values() if isinstance(m, TensorStorageMetadata))


def test_width_growth_on_ep2_reads_every_source_byte_once(source, tmp_path):
    """Depth x2 then width x2 (noise statistics of every source expert) into EP=2 with the append
    layout, where the layout puts a copy of every source expert on the second rank: each rank instead
    writes the original and the copy of the source experts it reads (a chunk is found by its offset,
    whoever wrote it), so all ranks together read the source exactly once (before: the statistics'
    reads plus one read per writing rank, ~2x) and no expert is sent between ranks (before: half of
    them were)."""
    grown = tmp_path / "grown"
    real = run_in_processes(grow_counted, 2, (source, str(grown), GROWTH,
                                               ParallelConfig(expert_model_parallel_size=2), 1))
    assert sum(r["bytes_read"] for r in real) == _stored_tensor_bytes(source)
    assert [r["bytes_received"] for r in real] == [0, 0]
    # Who wrote each grown expert: E source experts -> 2E, appended (target e + E copies source e).
    E = MODEL.num_moe_experts
    writer = _expert_writers(grown, "decoder.layers.mlp.experts.experts.linear_fc2.weight")
    assert len(writer) == 2 * E * 2 * MODEL.num_layers  # every (layer, expert) chunk of the grown model
    for (layer, e), file in writer.items():
        source_block = (e % E) * 2 // E
        assert file.startswith(f"__{source_block}_"), (layer, e, file)
