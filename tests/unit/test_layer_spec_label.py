"""A grown checkpoint is labelled with the layer spec whose names it holds.

With Transformer Engine importable, ``model.moe_expert_backend=grouped_mm`` still builds the local
spec (its experts are not a TE module). Growth used to take the label from "is TE importable" and
wrote a checkpoint labelled ``te`` that held local-spec names. TE cannot be installed on a CPU
machine, so "importable" is what is simulated here: ``te_available`` answers True; the model the
builder then makes is real, and so are the growth and the files it writes.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from megatron.core import parallel_state as ps

from megatron_grow.checkpoint import io, keys
from megatron_grow.checkpoint.manifest import build_manifest
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import DepthGrowthConfig, GrowthConfig, ParallelConfig
from megatron_grow.growth import grow as grow_module
from megatron_grow.growth.grow import grow_checkpoint
from megatron_grow.models import specs
from megatron_grow.models.builder import build_gpt_model
from megatron_grow.parallel.init import initialize_distributed


@pytest.fixture
def te_importable(monkeypatch):
    monkeypatch.setattr(specs, "te_available", lambda: True)
    if hasattr(grow_module, "te_available"):  # where growth read it before the fix
        monkeypatch.setattr(grow_module, "te_available", lambda: True)


def test_grouped_mm_growth_is_labelled_local_with_te_importable(te_importable, tmp_path):
    if not ps.model_parallel_is_initialized():
        initialize_distributed(ParallelConfig())
    model = dataclasses.replace(load_recipe("configs/models/tiny.yaml").model, moe_expert_backend="grouped_mm")
    gpt = build_gpt_model(model, ParallelConfig())
    manifest = build_manifest(model=model, layout={"tp": 1, "pp": 1, "ep": 1, "etp": 1, "dp": 1, "world_size": 1},
                              counters={"iteration": 1, "consumed_samples": 0, "consumed_tokens": 0,
                                        "flops_so_far": 0, "sunk_flops": 0}, lineage=[], recipe=None)
    src = os.path.join(tmp_path, "src")
    io.save_checkpoint(src, 1, io.model_sharded_state_dict([gpt]), manifest)
    grown = os.path.join(tmp_path, "grown")
    grow_checkpoint(os.path.join(src, "iter_0000001"), grown, GrowthConfig(order=("depth",),
                    depth=DepthGrowthConfig(factor=2)), ParallelConfig(), progress=False, expert_backend="grouped_mm")
    ckpt = os.path.join(grown, "iter_0000001")
    stored = io.read_storage_metadata(ckpt).state_dict_metadata
    with open(os.path.join(ckpt, "megatron_grow.json")) as f:
        label = json.load(f)["layer_spec"]
    assert keys.storage_spec(stored) == keys.LOCAL_SPEC  # the names it holds
    assert label == keys.LOCAL_SPEC  # and what it says it holds
