"""The streaming save's fast planning (``checkpoint.streaming``) describes exactly what Megatron-Core's
own conversion would, and its chunk check finds what DCP's finds.

* Write items: a grown tiny MoE (depth x2 + width x2, 16 experts) built on meta as rank 1 of 2 with
  EP=2 (``parallel.simulated``: fake process group, real Megatron-Core parallel state), bf16 and
  fp32: the items of ``streaming_save_plan``'s planner equal, item for item, those Megatron-Core's
  ``mcore_to_pyt_state_dict`` + ``MCoreSavePlanner`` produce for the same sharded state dict.
* Chunk check: ``global_plan_errors`` against DCP's ``_validate_global_plan`` (the definition) on
  hand-built chunk lists: a grid, a duplicate, an overlap off the grid, an out-of-bounds chunk and a gap.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import apply_factories
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.default_planner import _validate_global_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_grow.checkpoint import io
from megatron_grow.checkpoint.streaming import LazyShards, global_plan_errors, streaming_save_plan
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.growth.plan import make_growth_plan
from megatron_grow.models.builder import build_model_chunks
from megatron_grow.parallel.init import destroy_distributed
from megatron_grow.parallel.simulated import simulated_rank

RECIPE = load_recipe("configs/growth/tiny_depth_width.yaml")
TARGET = make_growth_plan(dataclasses.replace(RECIPE.model, seq_length=32), RECIPE.growth).target


def meta_state(dtype: torch.dtype) -> dict:
    chunks = build_model_chunks(TARGET, ParallelConfig(expert_model_parallel_size=2), meta=True, params_dtype=dtype)
    state = io.model_sharded_state_dict(chunks)
    apply_factories(state)
    for st in io.iter_sharded_tensors(state):
        st.data = st.data.to("meta")
    return state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_items_equal_megatron_cores_conversion(dtype):
    destroy_distributed()  # a simulated rank needs a process with no group; earlier in-process tests leave one
    with simulated_rank(ParallelConfig(expert_model_parallel_size=2), 1, 2):
        _, fast_dict, planner, lazy_count = streaming_save_plan(meta_state(dtype), None)
        planner.set_up_planner(fast_dict, storage_meta=None, is_coordinator=False)
        fast = planner.create_local_plan().items

        sharded, _ = save_preprocess(meta_state(dtype), validate_access_integrity=False)
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
        reference = MCoreSavePlanner(flatten_state_dict=False)
        reference.set_up_planner(mcore_to_pyt_state_dict(flat, is_loading=False), storage_meta=None,
                                 is_coordinator=False)
        expected = reference.create_local_plan().items
    assert any(isinstance(v, LazyShards) for v in fast_dict.values())
    assert lazy_count > 100  # every weight of the grown model is lazy here
    key = lambda item: (item.index.fqn, tuple(item.index.offset or ()))
    assert sorted(fast, key=key) == sorted(expected, key=key)


def metadata(size: tuple, chunks: list) -> Metadata:
    md = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(size),
                               [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks])
    return Metadata(state_dict_metadata={"w": md})


GRID = [((layer, expert, 0), (1, 1, 6)) for layer in range(3) for expert in range(4)]
CASES = {
    "grid": GRID,
    "duplicate (same volume)": GRID[:-1] + [GRID[5]],
    "overlap off the grid": GRID[:-1] + [((2, 3, 0), (1, 1, 3)), ((2, 3, 2), (1, 1, 4))],
    "out of bounds": GRID[:-1] + [((2, 3, 1), (1, 1, 6))],
    "gap": GRID[:-1],
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunk_check_agrees_with_dcps(case):
    md = metadata((3, 4, 6), CASES[case])
    plans = [None, None]  # two ranks: DCP checks the fill only then
    ours, dcps = global_plan_errors(plans, md), _validate_global_plan(plans, md)
    assert bool(ours) == bool(dcps), (ours, dcps)
    assert bool(ours) == (case != "grid")
