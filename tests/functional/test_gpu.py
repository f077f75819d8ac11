"""GPU tier: the model, the trainer and growth on CUDA with NCCL, bf16 weights with fp32 main
grads, both expert backends, and the Transformer Engine spec when TE imports.

Everything here is marked ``gpu`` and skipped, with the reason, without CUDA; tests that need
more ranks than the machine has GPUs skip with the count. Run the tier alone with
``pytest -m gpu tests/functional/test_gpu.py`` (``scripts/gpu/check.sh`` does, on one GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_grow.config.schema import ModelConfig, ParallelConfig
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.bodies import build_save_forward, grow_body, plain_tensors_of_many, tiny_model, train_sequence
from tests.distributed.conftest import kjv_dataset, write_recipe  # noqa: F401  (kjv_dataset is a fixture)

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU; this machine has none")]
BACKENDS = ["sequential", "grouped_mm"]


def needs_gpus(n: int):
    return pytest.mark.skipif(GPUS < n, reason=f"needs {n} CUDA GPU(s), this machine has {GPUS}")


def on_ranks(n: int, *args):
    """A parametrize entry that runs on ``n`` ranks and skips where fewer GPUs exist."""
    return pytest.param(n, *args, marks=needs_gpus(n), id=f"{n}gpu")


# ------------------------------------------------------------------------------------------------
# Bodies (module level: spawned ranks import them)


def _forward_backward(use_te: bool) -> dict:
    import time

    from megatron_grow.models.builder import build_gpt_model
    from megatron_grow.models.forward import causal_attention_mask, position_ids_for
    from megatron_grow.parallel.init import initialize_distributed

    initialize_distributed(ParallelConfig())
    model_cfg = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                            kv_channels=64, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=256,
                            vocab_size=1024, seq_length=256)
    model = build_gpt_model(model_cfg, params_dtype=torch.bfloat16, use_te=use_te).cuda()
    tokens = torch.randint(0, 1024, (4, 256), device="cuda")
    mask = causal_attention_mask(256, "cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(tokens, position_ids_for(tokens), mask, labels=tokens).float().mean()
    loss.backward()
    torch.cuda.synchronize()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return {"loss": float(loss), "seconds": time.perf_counter() - start, "grads": len(grads),
            "finite": all(torch.isfinite(g).all().item() for g in grads)}


def train_and_inspect(recipe_path: str, overrides: list) -> dict:
    """Train with the real trainer, then report dtypes of weights and of the grads the optimizer reads."""
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.training.trainer import Trainer

    trainer = Trainer(load_recipe(recipe_path, overrides))
    run = trainer.run()
    params = [p for chunk in trainer.chunks for p in chunk.parameters()]
    experts = [type(m).__name__ for chunk in trainer.raw_chunks for m in chunk.modules() if "MLP" in type(m).__name__
               or "Experts" in type(m).__name__]
    return {"losses": [loss for _, loss in run.train_losses], "device": str(params[0].device),
            "param_dtypes": sorted({str(p.dtype) for p in params}),
            "main_grad_dtypes": sorted({str(p.main_grad.dtype) for p in params if getattr(p, "main_grad", None)
                                        is not None}),
            "mfu": [i.get("mfu") for i in run.intervals], "peak": run.peak, "modules": sorted(set(experts))}


def deterministic_train_sequence(runs: list) -> list:
    """``train_sequence`` with CUDA's deterministic kernels (MoE scatter-adds otherwise use atomics)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    return train_sequence(runs)


def grown_vs_oracle(source_root: str, grown_root: str, growth) -> dict:
    """The grown checkpoint loaded on the GPU vs the plain-tensor oracle applied on the CPU."""
    from megatron_grow.checkpoint import io, paths
    from megatron_grow.checkpoint.manifest import read_checkpoint_info
    from megatron_grow.growth.plan import make_growth_plan
    from megatron_grow.growth.reference import grow_state_dict
    from megatron_grow.models.builder import build_gpt_model
    from megatron_grow.parallel.init import initialize_distributed

    initialize_distributed(ParallelConfig())
    src_dir, it = paths.resolve_checkpoint_dir(source_root)
    plan = make_growth_plan(read_checkpoint_info(src_dir, it).model, growth)
    source = build_gpt_model(plan.source)
    io.load_checkpoint(src_dir, io.model_sharded_state_dict([source]))
    plain = lambda sd: {k: v.detach().cpu().clone() for k, v in sd.items()
                        if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    oracle = grow_state_dict(plain(source.state_dict()), plan)
    grown = build_gpt_model(plan.target)
    io.load_checkpoint(paths.resolve_checkpoint_dir(grown_root)[0], io.model_sharded_state_dict([grown]))
    device = str(source.output_layer.weight.device)
    return {"oracle": plain(oracle), "sharded": plain(grown.state_dict()), "device": device}


def backends_side_by_side(dtype_name: str, seq_root: str, grp_root: str) -> dict:
    """Sequential model saved; grouped_mm model loads it; both run forward+backward on the GPU."""
    import dataclasses

    from megatron_grow.checkpoint import io, paths
    from megatron_grow.models.builder import build_gpt_model
    from megatron_grow.models.forward import causal_attention_mask, position_ids_for
    from megatron_grow.parallel.init import initialize_distributed
    from tests.distributed.bodies import test_manifest

    dtype = getattr(torch, dtype_name)
    initialize_distributed(ParallelConfig(), seed=5)
    cfg = tiny_model(hidden_size=256, moe_ffn_hidden_size=128, num_moe_experts=16, moe_router_topk=4, seq_length=256)
    grouped_cfg = dataclasses.replace(cfg, moe_expert_backend="grouped_mm")
    seq = build_gpt_model(cfg, params_dtype=dtype, use_te=False)
    io.save_checkpoint(seq_root, 1, io.model_sharded_state_dict([seq]), test_manifest(cfg))
    grp = build_gpt_model(grouped_cfg, params_dtype=dtype)
    io.load_checkpoint(paths.resolve_checkpoint_dir(seq_root)[0], io.model_sharded_state_dict([grp]))
    io.save_checkpoint(grp_root, 1, io.model_sharded_state_dict([grp]), test_manifest(grouped_cfg))
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_length), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    mask = causal_attention_mask(cfg.seq_length, "cuda")
    out = {}
    for name, model in (("sequential", seq), ("grouped_mm", grp)):
        loss = model(tokens, position_ids_for(tokens), mask, labels=tokens).float()
        loss.mean().backward()
        layer0 = model.decoder.layers[0].mlp.experts
        if name == "sequential":
            fc1 = torch.stack([e.linear_fc1.weight.grad for e in layer0.local_experts])
        else:
            fc1 = layer0.weight1.grad
        out[name] = {"loss": loss.detach().cpu(), "fc1_grad": fc1.float().cpu(), "type": type(layer0).__name__}
    return out


# ------------------------------------------------------------------------------------------------
# Tests


def test_local_spec_forward_backward_bf16():
    out = run_in_processes(_forward_backward, 1, (False,))[0]
    assert out["finite"] and out["grads"] > 0
    assert 6.0 < out["loss"] < 7.5  # ~ln(1024) at init
    print(out)


def test_transformer_engine_spec_forward_backward():
    pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    out = run_in_processes(_forward_backward, 1, (True,))[0]
    assert out["finite"] and out["grads"] > 0
    print(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_training_loss_falls_with_fp32_main_grads(kjv_dataset, tmp_path, backend):  # noqa: F811
    recipe = write_recipe(tmp_path / "r.yaml", kjv_dataset, tmp_path / "run",
                          model={"moe_expert_backend": backend},
                          training={"train_iters": 30, "bf16": True, "lr": 3.0e-3},
                          checkpoint={"save_interval": 1000}, logging={"log_interval": 5})
    out = run_in_processes(train_and_inspect, 1, (recipe, []))[0]
    print(out)
    assert out["device"].startswith("cuda")
    assert "torch.bfloat16" in out["param_dtypes"]
    assert out["main_grad_dtypes"] == ["torch.float32"]
    losses = out["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # from ~ln(512) = 6.24
    assert ("GroupedMMExperts" in out["modules"]) == (backend == "grouped_mm")
    if "MFU not computed" not in out["peak"]:
        assert all(m is not None and 0 < m < 1 for m in out["mfu"]), out["mfu"]


@pytest.mark.parametrize("world,parallel", [on_ranks(1, {}), on_ranks(2, {"expert_model_parallel_size": 2})])
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bitwise_on_gpu(kjv_dataset, tmp_path, world, parallel, backend):  # noqa: F811
    common = dict(parallel=parallel, model={"moe_expert_backend": backend},
                  training={"train_iters": 6, "bf16": True}, checkpoint={"save_interval": 3})
    straight = write_recipe(tmp_path / "a.yaml", kjv_dataset, tmp_path / "a", **common)
    split = write_recipe(tmp_path / "b.yaml", kjv_dataset, tmp_path / "b", **common)
    first, part1, part2 = run_in_processes(deterministic_train_sequence, world, (
        [(straight, []), (split, ["training.train_iters=3"]), (split, [])],))[0]
    losses = [loss for _, loss in first["train_losses"]]
    resumed = [loss for _, loss in part1["train_losses"] + part2["train_losses"]]
    assert [i for i, _ in part2["train_losses"]] == [4, 5, 6]
    assert resumed == losses, f"straight {losses} vs resumed {resumed}"
    a, b = run_in_processes(plain_tensors_of_many, 1, ([str(tmp_path / "a"), str(tmp_path / "b")],))[0]
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.mark.parametrize("world,parallel", [
    on_ranks(1, ParallelConfig()),
    on_ranks(2, ParallelConfig(expert_model_parallel_size=2)),
    on_ranks(2, ParallelConfig(tensor_model_parallel_size=2)),
])
def test_growth_with_nccl_equals_the_oracle(tmp_path, world, parallel):
    from megatron_grow.config.loader import load_recipe

    recipe = load_recipe("configs/growth/tiny_depth_width.yaml")  # interposition x2 then width x2, gaussian
    import dataclasses

    source_model = dataclasses.replace(recipe.model, seq_length=32)
    src, dst = str(tmp_path / "src"), str(tmp_path / "grown")
    run_in_processes(build_save_forward, 1, (source_model, ParallelConfig(), src))
    run_in_processes(grow_body, world, (src, dst, recipe.growth, parallel))
    both = run_in_processes(grown_vs_oracle, 1, (src, dst, recipe.growth))[0]
    assert both["device"].startswith("cuda")
    assert sorted(both["oracle"]) == sorted(both["sharded"])
    for key, value in both["oracle"].items():
        assert torch.equal(value, both["sharded"][key]), key


@pytest.mark.parametrize("dtype_name,loss_atol,grad_rel", [("float32", 1e-5, 1e-4), ("bfloat16", 2e-2, 5e-2)])
def test_grouped_mm_experts_match_sequential_on_gpu(tmp_path, dtype_name, loss_atol, grad_rel):
    """fp32 takes the per-expert path inside grouped_linear; bf16 takes torch's CUTLASS grouped GEMM.
    In bf16 a rounding difference can flip a later layer's top-k choice, so bf16 compares the mean
    loss and the relative error of layer 0's expert gradients, fp32 every token's loss."""
    seq_root, grp_root = str(tmp_path / "seq"), str(tmp_path / "grp")
    out = run_in_processes(backends_side_by_side, 1, (dtype_name, seq_root, grp_root))[0]
    seq, grp = out["sequential"], out["grouped_mm"]
    assert (seq["type"], grp["type"]) == ("SequentialMLP", "GroupedMMExperts")
    if dtype_name == "float32":
        torch.testing.assert_close(grp["loss"], seq["loss"], atol=loss_atol, rtol=0)
    assert abs(float(grp["loss"].mean()) - float(seq["loss"].mean())) <= loss_atol
    reference = float(seq["fc1_grad"].norm())
    assert reference > 0
    assert float((grp["fc1_grad"] - seq["fc1_grad"]).norm()) <= grad_rel * reference
    a, b = run_in_processes(plain_tensors_of_many, 1, ([seq_root, grp_root],))[0]
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
