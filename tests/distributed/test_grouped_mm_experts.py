"""The grouped_mm expert backend against MCore's SequentialMLP (fp32, CPU, gloo).

The SequentialMLP model is built and saved by stock MCore code paths; the grouped_mm model
loads that checkpoint, so any difference in keys, shapes, offsets or values shows up as a
failed load, different logits or gradients, or different saved tensors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_grow.checkpoint import io, paths
from megatron_grow.config.schema import DepthGrowthConfig, GrowthConfig, ParallelConfig, WidthGrowthConfig
from megatron_grow.models.builder import build_gpt_model
from megatron_grow.models.forward import causal_attention_mask, position_ids_for
from megatron_grow.parallel.init import initialize_distributed
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.bodies import grow_body, plain_tensors_of_many, probe_batches, tiny_model, train_sequence
from tests.distributed.bodies import test_manifest as manifest_for
from tests.distributed.conftest import write_recipe
from tests.distributed.optimizer_bodies import state_dict_leaves

SEQUENTIAL = tiny_model()
GROUPED = dataclasses.replace(SEQUENTIAL, moe_expert_backend="grouped_mm")
# Same arithmetic per expert; only the order of float accumulations inside a GEMM may differ.
ATOL = 1e-5

LAYOUTS = {
    "serial": (1, ParallelConfig()),
    "ep2": (2, ParallelConfig(expert_model_parallel_size=2)),
    "tp2": (2, ParallelConfig(tensor_model_parallel_size=2)),
}


def _layout_of(model) -> list:
    """Everything that decides where a tensor lands in a checkpoint, factories applied, sorted."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    rows = []
    for st in io.iter_sharded_tensors(sd):
        if isinstance(st, ShardedTensor):
            rows.append((st.key, tuple(st.global_shape), tuple(st.global_offset), tuple(st.axis_fragmentations),
                         str(st.replica_id), tuple(st.local_shape), st.prepend_axis_num, str(st.dtype)))
    objects = [v for v in state_dict_leaves(sd) if isinstance(v, ShardedObject)]
    rows += [(o.key, tuple(o.global_shape), tuple(o.global_offset), str(o.replica_id)) for o in objects]
    return sorted(rows, key=str)


def _forward_backward(model, batches):
    mask = causal_attention_mask(SEQUENTIAL.seq_length)
    losses = []
    for tokens in batches:
        loss = model(tokens, position_ids_for(tokens), mask, labels=tokens)
        losses.append(loss.detach().clone())
        loss.float().mean().backward()
    return torch.stack(losses)


def _expert_grads_sequential(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        if ".local_experts." in name:
            out[name] = p.grad.clone()
    return out


def _expert_grads_grouped(model) -> dict:
    """The grouped model's stacked grads, renamed to SequentialMLP's per-expert parameter names."""
    out = {}
    for name, p in model.named_parameters():
        for stacked, linear in (("weight1", "linear_fc1"), ("weight2", "linear_fc2")):
            if name.endswith(f".experts.{stacked}"):
                base = name[: -len(stacked)]
                for e in range(p.shape[0]):
                    out[f"{base}local_experts.{e}.{linear}.weight"] = p.grad[e].clone()
    return out


def compare_backends(parallel: ParallelConfig, seq_root: str, grp_root: str) -> dict:
    """Sequential model (MCore init) saved; grouped model loads it, re-saves it; both run forward+backward."""
    initialize_distributed(parallel, seed=1234)
    seq = build_gpt_model(SEQUENTIAL, parallel)
    io.save_checkpoint(seq_root, 1, io.model_sharded_state_dict([seq]), manifest_for(SEQUENTIAL))
    torch.manual_seed(99)  # a different init: every grouped weight must come from the checkpoint
    grp = build_gpt_model(GROUPED, parallel)
    io.load_checkpoint(paths.resolve_checkpoint_dir(seq_root)[0], io.model_sharded_state_dict([grp]))
    io.save_checkpoint(grp_root, 1, io.model_sharded_state_dict([grp]), manifest_for(GROUPED))
    batches = probe_batches(SEQUENTIAL)
    loss_seq, loss_grp = _forward_backward(seq, batches), _forward_backward(grp, batches)
    grads_seq, grads_grp = _expert_grads_sequential(seq), _expert_grads_grouped(grp)
    other_seq = {n: p.grad for n, p in seq.named_parameters() if ".local_experts." not in n}
    other_grp = {n: p.grad for n, p in grp.named_parameters() if ".experts.weight" not in n}
    return {
        "layout_equal": _layout_of(seq) == _layout_of(grp),
        "grouped_type": type(grp.decoder.layers[0].mlp.experts).__name__,
        "loss": (loss_seq, loss_grp),
        "expert_grad_names": (sorted(grads_seq), sorted(grads_grp)),
        "expert_grad_diff": max(float((grads_seq[k] - grads_grp[k]).abs().max()) for k in grads_seq),
        "expert_grad_scale": max(float(g.abs().max()) for g in grads_seq.values()),
        "other_grad_diff": max(float((other_seq[k] - other_grp[k]).abs().max()) for k in other_seq),
        "other_names_equal": sorted(other_seq) == sorted(other_grp),
    }


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_grouped_mm_matches_sequential_and_checkpoints_are_identical(tmp_path, name):
    world, parallel = LAYOUTS[name]
    seq_root, grp_root = str(tmp_path / "seq"), str(tmp_path / "grp")
    results = run_in_processes(compare_backends, world, (parallel, seq_root, grp_root))
    for r in results:
        assert r["grouped_type"] == "GroupedMMExperts"
        assert r["layout_equal"], "sharded state dicts differ between SequentialMLP and GroupedMMExperts"
        torch.testing.assert_close(r["loss"][1], r["loss"][0], atol=ATOL, rtol=0)
        assert r["expert_grad_names"][0] == r["expert_grad_names"][1]
        assert r["expert_grad_scale"] > 0  # the comparison is not between zeros
        assert r["expert_grad_diff"] <= ATOL * max(1.0, r["expert_grad_scale"])
        assert r["other_names_equal"] and r["other_grad_diff"] <= ATOL
    seq_tensors, grp_tensors = run_in_processes(plain_tensors_of_many, 1, ([seq_root, grp_root],))[0]
    assert sorted(seq_tensors) == sorted(grp_tensors)
    assert any(".experts.experts.linear_fc1.weight" in k for k in seq_tensors)
    for key, value in seq_tensors.items():
        assert torch.equal(value, grp_tensors[key]), key


def grouped_checkpoint_roundtrip(root_in: str, root_out: str) -> bool:
    """A grouped_mm model written by grouped_mm (TP=2 here) loads back into SequentialMLP unchanged."""
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    initialize_distributed(parallel, seed=7)
    grp = build_gpt_model(GROUPED, parallel)
    io.save_checkpoint(root_in, 1, io.model_sharded_state_dict([grp]), manifest_for(GROUPED))
    seq = build_gpt_model(SEQUENTIAL, parallel)
    io.load_checkpoint(paths.resolve_checkpoint_dir(root_in)[0], io.model_sharded_state_dict([seq]))
    io.save_checkpoint(root_out, 1, io.model_sharded_state_dict([seq]), manifest_for(SEQUENTIAL))
    return True


def test_checkpoint_written_by_grouped_mm_loads_into_sequential(tmp_path):
    a, b = str(tmp_path / "grp"), str(tmp_path / "seq")
    run_in_processes(grouped_checkpoint_roundtrip, 2, (a, b))
    first, second = run_in_processes(plain_tensors_of_many, 1, ([a, b],))[0]
    assert sorted(first) == sorted(second)
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def save_source(root: str) -> bool:
    initialize_distributed(ParallelConfig(), seed=3)
    model = build_gpt_model(SEQUENTIAL)
    io.save_checkpoint(root, 1, io.model_sharded_state_dict([model]), manifest_for(SEQUENTIAL))
    return True


def grow_into_backend(source_root: str, grown_root: str, growth, parallel: ParallelConfig, backend: str):
    from megatron_grow.growth.grow import grow_checkpoint

    return grow_checkpoint(source_root, grown_root, growth, parallel, progress=False, expert_backend=backend)


@pytest.mark.slow
def test_growth_into_grouped_mm_target_equals_sequential_target(tmp_path):
    """Depth x2 then width x2 (with noise) grown into grouped_mm experts on EP=2 writes the same
    checkpoint as the same growth into SequentialMLP experts."""
    src, seq_dst, grp_dst = str(tmp_path / "src"), str(tmp_path / "seq"), str(tmp_path / "grp")
    growth = GrowthConfig(order=("depth", "width"), depth=DepthGrowthConfig(factor=2),
                          width=WidthGrowthConfig(factor=2))
    run_in_processes(save_source, 1, (src,))
    ep2 = ParallelConfig(expert_model_parallel_size=2)
    run_in_processes(grow_body, 2, (src, seq_dst, growth, ep2))
    run_in_processes(grow_into_backend, 2, (src, grp_dst, growth, ep2, "grouped_mm"))
    seq_tensors, grp_tensors = run_in_processes(plain_tensors_of_many, 1, ([seq_dst, grp_dst],))[0]
    # [layers, experts, H, F]: 4 -> 8 layers, 4 -> 8 experts
    assert tuple(seq_tensors["decoder.layers.mlp.experts.experts.linear_fc2.weight"].shape[:2]) == (8, 8)
    assert sorted(seq_tensors) == sorted(grp_tensors)
    for key, value in seq_tensors.items():
        assert torch.equal(value, grp_tensors[key]), key


@pytest.mark.parametrize("world,parallel", [(1, {}), (2, {"expert_model_parallel_size": 2})], ids=["serial", "ep2"])
def test_training_with_grouped_mm_resumes_bitwise(kjv_dataset, tmp_path, world, parallel):
    """The trainer (DDP, distributed optimizer, checkpoints with optimizer state) on grouped_mm experts."""
    common = dict(parallel=parallel, model={"moe_expert_backend": "grouped_mm"}, training={"train_iters": 6},
                  checkpoint={"save_interval": 3})
    straight = write_recipe(tmp_path / "a.yaml", kjv_dataset, tmp_path / "a", **common)
    split = write_recipe(tmp_path / "b.yaml", kjv_dataset, tmp_path / "b", **common)
    first, part1, part2 = run_in_processes(train_sequence, world, ([(straight, []), (split, ["training.train_iters=3"]),
                                                                    (split, [])],))[0]
    losses = [loss for _, loss in first["train_losses"]]
    assert [loss for _, loss in part1["train_losses"] + part2["train_losses"]] == losses
    assert losses[-1] < losses[0]


def test_resume_across_backends_loads_weights_and_starts_moments_fresh(kjv_dataset, tmp_path, capfd):
    """3 steps with sequential experts, then a grouped_mm run resumes that checkpoint: it loads the
    weights at iteration 3 and says that Adam moments start fresh (their flat layout differs)."""
    recipe = write_recipe(tmp_path / "a.yaml", kjv_dataset, tmp_path / "a", training={"train_iters": 3},
                          checkpoint={"save_interval": 3})
    grouped = ["training.train_iters=5", "model.moe_expert_backend=grouped_mm"]
    run_in_processes(train_sequence, 1, ([(recipe, []), (recipe, grouped)],))
    out = capfd.readouterr().out
    assert "was written with model.moe_expert_backend=sequential, this run uses grouped_mm" in out
    assert "resumed from" in out and "at iteration 3" in out
