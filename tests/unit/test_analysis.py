"""Pieces of the checkpoint tools that need no Megatron model: region reads, LR phases, the cliff
metric, and advise's choice on runs whose manifests say different things."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_grow.analysis.advice import advise_run, decay_start, lr_phase
from megatron_grow.analysis.weight_norms import largest_drop, norm_profile, rms
from megatron_grow.checkpoint import paths
from megatron_grow.checkpoint.manifest import build_manifest
from megatron_grow.checkpoint.reader import CheckpointReader, checkpoint_name
from megatron_grow.errors import CheckpointError
from megatron_grow.models.params import count_params
from megatron_grow.training.flops import chinchilla_flops
from tests.distributed.bodies import tiny_model


def _dcp_checkpoint(root, tensors: dict) -> str:
    """A plain torch DCP checkpoint (one chunk per tensor) in Megatron-LM's layout."""
    import torch.distributed.checkpoint as dcp

    ckpt = paths.iteration_dir(str(root), 7)
    os.makedirs(ckpt)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(ckpt), no_dist=True)
    with open(os.path.join(ckpt, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, f)
    paths.write_tracker(str(root), 7)
    return ckpt


def test_region_reads_equal_slices(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, 7, 4, generator=g), "b": torch.randn(11, generator=g).to(torch.bfloat16)}
    _dcp_checkpoint(tmp_path, tensors)
    r = CheckpointReader(str(tmp_path))
    assert r.iteration == 7
    assert r.tensors["a"].shape == (3, 5, 7, 4) and r.tensors["b"].dtype == torch.bfloat16
    assert torch.equal(r.read("a"), tensors["a"]) and torch.equal(r.read("b"), tensors["b"])
    for _ in range(20):
        off = [int(torch.randint(0, d, (1,), generator=g)) for d in (3, 5, 7, 4)]
        size = [int(torch.randint(1, d - o + 1, (1,), generator=g)) for o, d in zip(off, (3, 5, 7, 4))]
        want = tensors["a"][tuple(slice(o, o + n) for o, n in zip(off, size))]
        assert torch.equal(r.read("a", off, size), want)
    slabs = list(r.iter_slabs("a", lead_dims=2, max_bytes=2 * 7 * 4 * 4))
    assert [idx for idx, _ in slabs] == [(i, j) for i in range(3) for j in (0, 2, 4)]
    assert torch.equal(torch.cat([s for _, s in slabs]).reshape(3, 5, 7, 4), tensors["a"])
    with pytest.raises(ValueError, match="outside"):
        r.read("a", (2, 0, 0, 0), (2, 5, 7, 4))
    with pytest.raises(CheckpointError, match="not in checkpoint"):
        r.read("c")


@pytest.mark.slow
def test_reader_needs_no_process_group(tmp_path):
    """In a fresh interpreter with no torch.distributed group, the reader reads a region."""
    import subprocess
    import sys

    tensors = {"a": torch.arange(24.0).view(2, 3, 4)}
    _dcp_checkpoint(tmp_path, tensors)
    code = ("import torch\n"
            "from megatron_grow.checkpoint.reader import CheckpointReader\n"
            f"r = CheckpointReader({str(tmp_path)!r})\n"
            "x = r.read('a', (1, 0, 2), (1, 3, 2))\n"
            "assert not torch.distributed.is_initialized()\n"
            "print(x.flatten().tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(tensors["a"][1:2, :, 2:4].flatten().tolist())


def test_reader_refuses_non_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration"):
        CheckpointReader(str(tmp_path))
    (tmp_path / "iter_0000001").mkdir()
    with pytest.raises(CheckpointError, match="metadata.json is missing"):
        CheckpointReader(str(tmp_path / "iter_0000001"))


def test_checkpoint_name():
    assert checkpoint_name("/x/runs/stack/") == "stack"
    assert checkpoint_name("/x/runs/base/iter_0001600") == "base@1600"


def test_rms_is_frobenius_over_sqrt_numel():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert float(rms(w, (0, 1))) == pytest.approx(5 / 2)


def test_largest_drop():
    assert largest_drop([1, 2, 3, 4])["layer"] is None
    j = largest_drop([1.0, 1.1, 1.2, 1.3, 1.0, 1.1, 1.2, 1.3])
    assert j["layer"] == 3 and j["drop"] == pytest.approx(0.3) and j["ratio"] == pytest.approx(3.0)


WSD = {"lr_decay_style": "WSD", "train_iters": 1000, "lr_wsd_decay_iters": 250, "lr_warmup_iters": 10}


@pytest.mark.parametrize("training, iteration, phase", [
    (WSD, 5, "warmup"), (WSD, 10, "stable"), (WSD, 750, "stable"), (WSD, 751, "decay"), (WSD, 1000, "decay"),
    ({**WSD, "lr_decay_iters": 2000}, 1000, "stable"),
    ({**WSD, "lr_wsd_decay_iters": 0}, 1000, "stable"),
    ({"lr_decay_style": "constant", "lr_warmup_iters": 0}, 50, "constant"),
    ({"lr_decay_style": "cosine", "lr_warmup_iters": 10}, 50, "decay"),
    ({}, 50, "unknown"), (None, 50, "unknown"),
])
def test_lr_phase(training, iteration, phase):
    assert lr_phase(training, iteration) == phase


def test_lr_phase_after_growth_shifts_warmup_not_decay():
    assert lr_phase(WSD, 505, schedule_start=500) == "warmup"
    assert lr_phase(WSD, 510, schedule_start=500) == "stable"
    assert lr_phase(WSD, 751, schedule_start=500) == "decay"


def test_decay_start():
    assert decay_start(WSD) == 750 and decay_start({"lr_decay_style": "cosine"}) is None and decay_start({}) is None


MODEL = tiny_model()
FC = chinchilla_flops(count_params(MODEL).activated)


def _manifest_run(root, points, training=None) -> str:
    """Checkpoint directories holding only their description (advise reads no tensors)."""
    for it, fc_multiple in points:
        d = paths.iteration_dir(str(root), it)
        os.makedirs(d)
        with open(os.path.join(d, "metadata.json"), "w") as f:
            json.dump({"sharded_backend": "torch_dist"}, f)
        counters = {"iteration": it, "consumed_tokens": it * 1000, "flops_so_far": fc_multiple * FC}
        m = build_manifest(model=MODEL, layout={}, counters=counters, lineage=[],
                           recipe={"training": training} if training else None)
        with open(os.path.join(d, paths.MANIFEST_FILENAME), "w") as f:
            json.dump(m, f)
    return str(root)


def test_advise_below_one_fc_picks_latest_constant_and_warns(tmp_path):
    run = _manifest_run(tmp_path, [(100, 0.2), (200, 0.5), (300, 0.9)],
                        {"lr_decay_style": "constant", "lr_warmup_iters": 0})
    rep = advise_run(run)
    assert rep["recommendation"]["iteration"] == 300
    assert any("no constant-LR checkpoint has reached 1x F_c" in w for w in rep["warnings"])


def test_advise_all_decaying_warns_about_annealing(tmp_path):
    run = _manifest_run(tmp_path, [(100, 2.0), (200, 3.0)],
                        {"lr_decay_style": "cosine", "lr_warmup_iters": 0, "train_iters": 200})
    rep = advise_run(run)
    assert rep["recommendation"]["iteration"] == 200 and all(r["phase"] == "decay" for r in rep["rows"])
    assert any("annealing" in w for w in rep["warnings"])


def test_advise_unknown_schedule(tmp_path):
    run = _manifest_run(tmp_path, [(100, 0.5), (200, 1.5), (300, 2.5)])
    rep = advise_run(run)
    assert rep["recommendation"]["iteration"] == 300 and rep["rows"][0]["phase"] == "unknown"
    assert any("do not record the LR schedule" in w for w in rep["warnings"])


def test_advise_skips_incomplete_saves(tmp_path):
    run = _manifest_run(tmp_path, [(100, 1.5)], dict(WSD, train_iters=400, lr_wsd_decay_iters=100))
    os.makedirs(os.path.join(run, "iter_0000200.incomplete-abc"))
    os.makedirs(os.path.join(run, "iter_0000300"))  # no metadata.json: a save that never finished
    rep = advise_run(run)
    assert [r["iteration"] for r in rep["rows"]] == [100]


def test_advise_megatron_lm_checkpoint_without_manifest(tmp_path):
    """Counters, architecture and schedule from ``common.pt`` args, as Megatron-LM writes them."""
    import argparse

    m = MODEL
    for it in (100, 200):
        d = paths.iteration_dir(str(tmp_path), it)
        os.makedirs(d)
        with open(os.path.join(d, "metadata.json"), "w") as f:
            json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                       "common_backend_version": 1}, f)
        args = argparse.Namespace(
            num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
            group_query_attention=True, num_query_groups=m.num_query_groups, kv_channels=m.kv_channels,
            num_experts=m.num_moe_experts, swiglu=True, position_embedding_type="rope",
            moe_router_topk=m.moe_router_topk, moe_ffn_hidden_size=m.moe_ffn_hidden_size, seq_length=m.seq_length,
            padded_vocab_size=256, consumed_train_samples=it * 8, lr_decay_style="WSD", train_iters=200,
            lr_warmup_iters=0, lr_wsd_decay_iters=50, lr_decay_iters=None)
        torch.save({"iteration": it, "num_floating_point_operations_so_far": it * 0.01 * FC, "args": args},
                   os.path.join(d, "common.pt"))
    rep = advise_run(str(tmp_path))
    assert [(r["iteration"], r["phase"]) for r in rep["rows"]] == [(100, "stable"), (200, "decay")]
    assert rep["rows"][0]["tokens"] == 100 * 8 * m.seq_length
    assert rep["rows"][1]["sunk_flops"] == pytest.approx(2.0 * FC) and not rep["rows"][1]["estimated"]
    assert rep["rows"][0]["chinchilla_flops"] == FC


def test_norm_profile_of_a_training_checkpoint_reads_the_weights_not_the_optimizer_state(tmp_path):
    """A training checkpoint also stores optimizer.state.{param,exp_avg,exp_avg_sq}.<weight key> with the
    weight's shape; the profile is the weights' RMS (expected values from the definition, per layer the
    mean over gate, up, down and the experts)."""
    g = torch.Generator().manual_seed(0)
    fc1_key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    fc2_key = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
    weights = {fc1_key: torch.randn(2, 3, 8, 4, generator=g), fc2_key: torch.randn(2, 3, 4, 4, generator=g) * 2}
    tensors = dict(weights)
    for state in ("param", "exp_avg", "exp_avg_sq"):
        for key, w in weights.items():
            tensors[f"optimizer.state.{state}.{key}"] = w * 100.0
    ckpt = _dcp_checkpoint(tmp_path, tensors)
    torch.save({"iteration": 7}, os.path.join(ckpt, "common.pt"))  # Megatron-LM's non-sharded entries
    profile = norm_profile(str(tmp_path), gated=True)

    def rms_of(t):
        return float(t.pow(2).mean().sqrt())

    for layer in range(2):
        per_proj = [sum(rms_of(part[layer, e]) for e in range(3)) / 3 for part in
                    (weights[fc1_key][:, :, :4], weights[fc1_key][:, :, 4:], weights[fc2_key])]
        assert profile.experts[layer] == pytest.approx(sum(per_proj) / 3, rel=1e-6)
