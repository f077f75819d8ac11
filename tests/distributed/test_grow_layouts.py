"""Growth on load, end to end on CPU with gloo.

* one source checkpoint (TP=1, EP=1) grown into 1 process, TP=2, EP=2, PP=2 and TP=2 x EP=2:
  all grown checkpoints are bit-identical tensor by tensor;
* the sharded growth equals the plain-tensor oracle (growth.reference) exactly;
* depth interposition: every new layer equals its source layer;
* gaussian width noise: copies differ from originals by noise of std alpha * std;
* width growth with noise none / antithetic: grown logits equal the source's (EP=2 target).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.bodies import (
    build_save_forward,
    first_result,
    grow_body,
    load_forward,
    oracle_vs_sharded,
    plain_tensors,
    plain_tensors_of_many,
)

RECIPE = load_recipe("configs/growth/tiny_depth_width.yaml")
SOURCE_MODEL = dataclasses.replace(RECIPE.model, seq_length=32)
GROWTH = RECIPE.growth  # interposition k=2, then width m=2 gaussian alpha=0.01

TARGETS = {
    "tp1": (1, ParallelConfig()),
    "tp2": (2, ParallelConfig(tensor_model_parallel_size=2)),
    "ep2": (2, ParallelConfig(expert_model_parallel_size=2)),
    "pp2": (2, ParallelConfig(pipeline_model_parallel_size=2)),
    "tp2_ep2": (4, ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2)),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("src") / "ckpt")
    ref = first_result(run_in_processes(build_save_forward, 1, (SOURCE_MODEL, ParallelConfig(), root)))
    return root, ref


@pytest.fixture(scope="module")
def grown(source, tmp_path_factory):
    root, _ = source
    out = {}
    for name, (world, parallel) in TARGETS.items():
        dst = str(tmp_path_factory.mktemp(name) / "grown")
        run_in_processes(grow_body, world, (root, dst, GROWTH, parallel))
        out[name] = dst
    return out


@pytest.fixture(scope="module")
def all_tensors(source, grown):
    """Plain tensors of the source and of every grown checkpoint, read in one process."""
    names = list(grown)
    loaded = run_in_processes(plain_tensors_of_many, 1, ([source[0]] + [grown[n] for n in names],))[0]
    return loaded[0], dict(zip(names, loaded[1:]))


@pytest.fixture(scope="module")
def grown_tensors(all_tensors):
    return all_tensors[1]


@pytest.fixture(scope="module")
def source_tensors(all_tensors):
    return all_tensors[0]


def test_grown_checkpoints_identical_across_layouts(grown_tensors):
    ref = grown_tensors["tp1"]
    assert any("experts" in k for k in ref)
    for name, tensors in grown_tensors.items():
        assert sorted(tensors) == sorted(ref), name
        for key, value in ref.items():
            assert tensors[key].shape == value.shape, (name, key)
            assert torch.equal(tensors[key], value), f"{name}: {key} differs from the 1-process growth"


def test_sharded_growth_equals_plain_tensor_oracle(source, grown):
    both = run_in_processes(oracle_vs_sharded, 1, (source[0], grown["ep2"], GROWTH))[0]
    oracle, sharded = both["oracle"], both["sharded"]
    assert sorted(oracle) == sorted(sharded)
    for key in oracle:
        assert torch.equal(oracle[key], sharded[key]), key


def test_interposed_layers_equal_their_source_layer(source_tensors, grown_tensors):
    grown = grown_tensors["tp1"]
    checked = 0
    for key, src in source_tensors.items():
        if not key.startswith("decoder.layers.") or ".mlp.router." in key or ".mlp.experts." in key:
            continue  # width growth changed those; everything else moves with its layer unchanged
        for j in range(grown[key].shape[0]):
            assert torch.equal(grown[key][j], src[j // 2]), (key, j)
        checked += 1
    assert checked >= 6  # qkv, proj, q/k norm, both layer norms


def test_gaussian_copies_carry_noise_of_alpha_times_std(source_tensors, grown_tensors):
    alpha = GROWTH.width.alpha
    grown = grown_tensors["tp1"]
    E = SOURCE_MODEL.num_moe_experts
    for suffix in ("linear_fc1.weight", "linear_fc2.weight"):
        key = next(k for k in grown if k.endswith("experts.experts." + suffix))
        src, g = source_tensors[key], grown[key]
        for j in range(g.shape[0]):
            for e in range(E):
                original = src[j // 2, e]
                assert torch.equal(g[j, e], original), "originals stay exact"
                delta = (g[j, e + E] - original).double()
                expected = alpha * original.double().std().item()
                assert delta.abs().max() > 0
                assert abs(delta.std().item() / expected - 1) < 0.15, (key, j, e)
    # Two depth copies of one source layer get different noise (keyed by target layer).
    key = next(k for k in grown if k.endswith("experts.experts.linear_fc2.weight"))
    assert not torch.equal(grown[key][0, E], grown[key][1, E])


@pytest.mark.parametrize("noise_mode", ["none", "antithetic"])
def test_width_growth_preserves_logits(source, tmp_path, noise_mode):
    root, ref = source
    width = dataclasses.replace(GROWTH.width, noise=noise_mode)
    growth = dataclasses.replace(GROWTH, order=("width",), depth=None, width=width)
    dst = str(tmp_path / "grown")
    parallel = ParallelConfig(expert_model_parallel_size=2)
    run_in_processes(grow_body, 2, (root, dst, growth, parallel))
    target = dataclasses.replace(SOURCE_MODEL, num_moe_experts=16, moe_router_topk=4)
    out = first_result(run_in_processes(load_forward, 2, (target, parallel, dst)))
    torch.testing.assert_close(out["logits"], ref["logits"], atol=1e-5, rtol=0)
    if noise_mode == "antithetic":
        tensors = run_in_processes(plain_tensors, 1, (dst,))[0]
        key = next(k for k in tensors if k.endswith("experts.experts.linear_fc2.weight"))
        assert not torch.equal(tensors[key][:, :8], tensors[key][:, 8:]), "antithetic copies must differ"
