"""``megatron-grow plan``: JSON contents, the chosen world, and refusal of impossible layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_grow.__main__ import main
from megatron_grow.config.loader import load_recipe
from megatron_grow.models.params import count_params
from megatron_grow.training.flops import training_flops_per_token

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "models" / "tiny.yaml")
B17 = str(ROOT / "configs" / "models" / "17b.yaml")
KEYS = {"total_params", "active_params", "active_params_without_embedding", "memory_per_gpu_gib",
        "memory_breakdown_gib", "flops_per_step", "flops_per_token", "step_time_s", "time_per_1b_tokens_s",
        "layout"}


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_for_17b(capsys):
    plan = plan_json(capsys, "--config", B17)
    assert KEYS <= set(plan)
    # The paper's count: 2.1B activated with both embeddings, 1.7B with the head only.
    assert abs(plan["active_params"] / 1e9 - 2.1) <= 0.1
    assert abs(plan["active_params_without_embedding"] / 1e9 - 1.7) <= 0.1
    assert abs(plan["total_params"] / 1e9 - 18.0) <= 0.1
    lay = plan["layout"]
    assert (lay["world_size"], lay["tp"], lay["pp"], lay["ep"], lay["etp"], lay["dp"], lay["expert_dp"]) == \
        (8, 1, 1, 8, 1, 8, 1)
    assert plan["flops_per_step"] == plan["flops_per_token"] * 1024 * 4096
    assert plan["step_time_s"] == pytest.approx(plan["flops_per_step"] / (8 * 989.5e12 * 0.4))
    assert plan["time_per_1b_tokens_s"] == pytest.approx(plan["step_time_s"] * 1e9 / (1024 * 4096))
    assert sum(plan["memory_breakdown_gib"].values()) == pytest.approx(plan["memory_per_gpu_gib"])
    assert 0 < plan["memory_per_gpu_gib"] < 80


def test_nodes_and_mfu_scale_the_time(capsys):
    one = plan_json(capsys, "--config", B17)
    four = plan_json(capsys, "--config", B17, "--nodes", "4", "--mfu", "0.2")
    assert four["layout"]["world_size"] == 32 and four["layout"]["dp"] == 32 and four["layout"]["expert_dp"] == 4
    assert four["step_time_s"] == pytest.approx(one["step_time_s"] / 4 * 2)
    assert four["memory_breakdown_gib"]["optimizer"] < one["memory_breakdown_gib"]["optimizer"]


def test_tiny_values_and_overrides(capsys):
    plan = plan_json(capsys, "--config", TINY, "model.num_layers=8", "parallel.expert_model_parallel_size=4")
    model = load_recipe(TINY, ["model.num_layers=8"]).model
    assert plan["total_params"] == count_params(model).total
    assert plan["active_params"] == count_params(model).activated
    assert plan["flops_per_token"] == training_flops_per_token(model).total
    assert plan["layout"]["ep"] == 4 and plan["layout"]["world_size"] == 8  # one node of 8 by default


def test_mixed_stack_with_shared_expert_and_mla_by_hand(capsys):
    # DeepSeek-V3 style tiny: layers [dense, MoE, MoE, MoE], dense MLP D 80; MoE layers: 8 experts of F 32 (top-2),
    # router [8, 64], a shared expert S 48 with a [1, 64] gate; MLA in every layer: 4 heads, query latent 24,
    # key/value latent 16, per head 8 + 8 (RoPE) query/key and 12 value; H 64, vocab 256 untied, s 64.
    plan = plan_json(capsys, "--config", TINY, "model.moe_layer_freq=[0,1,1,1]", "model.ffn_hidden_size=80",
                     "model.moe_shared_expert_intermediate_size=48", "model.moe_shared_expert_gate=true",
                     "model.multi_latent_attention=true", "model.q_lora_rank=24", "model.kv_lora_rank=16",
                     "model.qk_head_dim=8", "model.qk_pos_emb_head_dim=8", "model.v_head_dim=12",
                     "model.moe_router_num_groups=4", "model.moe_router_group_topk=2")
    mla = 64 * 24 + 24 * 4 * 16 + 64 * (16 + 8) + 16 * 4 * (8 + 12) + 4 * 12 * 64   # q down/up, kv down/up, out
    norms = 2 * 64 + 24 + 16                 # input and pre-MLP norms, the two latent norms
    expert = 64 * 2 * 32 + 32 * 64           # SwiGLU fc1 [2F, H] and fc2 [H, F]
    dense_layer = mla + norms + 64 * 2 * 80 + 80 * 64
    moe_layer = mla + norms + 8 * 64 + 8 * expert + (64 * 2 * 48 + 48 * 64) + 64
    total = dense_layer + 3 * moe_layer + 2 * 256 * 64 + 64   # embedding, output layer, final norm
    assert plan["total_params"] == total == 261_536
    assert plan["active_params"] == total - 3 * 6 * expert   # 6 of 8 routed experts idle in each MoE layer
    # Forward matmul FLOPs per token (2 per multiply-add), full attention over s = 64 keys; training = 3 x.
    attention = 4 * (2 * mla + 2 * 64 * 4 * 16 + 2 * 64 * 4 * 12)   # projections, Q K^T, A V
    moe = 3 * (2 * 64 * 8 + 2 * 3 * 2 * 64 * 32 + 3 * 2 * 64 * 48 + 2 * 64)  # router, 2 experts, shared expert, gate
    dense = 3 * 2 * 64 * 80
    assert plan["flops_per_token"] == 3 * (attention + moe + dense + 2 * 64 * 256) == 974_976


def test_default_world_for_pipeline_recipe(capsys):
    # 35b: pp 4 x ep 8 needs 32 GPUs for the expert layout: 4 nodes.
    plan = plan_json(capsys, "--config", str(ROOT / "configs" / "models" / "35b.yaml"))
    assert plan["layout"]["world_size"] == 32 and plan["layout"]["nodes"] == 4


def test_human_table_is_aligned(capsys):
    assert main(["plan", "--config", B17]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("total params") for line in lines)
    assert any("activated params" in line and "2.176B" in line for line in lines)
    # The value column starts at the same offset on every row.
    starts = {len(line) - len(line.split("  ", 1)[1].lstrip()) for line in lines if not line.startswith(" ")}
    assert len(starts) == 1


@pytest.mark.parametrize("args, message", [
    (["parallel.tensor_model_parallel_size=3"], "must divide model.num_attention_heads (4)"),
    (["parallel.expert_model_parallel_size=3"], "must divide model.num_moe_experts (8)"),
    (["parallel.pipeline_model_parallel_size=3"], "must divide model.num_layers (4)"),
    (["--nodes", "1", "--gpus-per-node", "4", "training.global_batch_size=6"],
     "training.global_batch_size (6) must be divisible by micro_batch_size x data-parallel size"),
    (["--nodes", "1", "--gpus-per-node", "6", "parallel.tensor_model_parallel_size=2",
      "parallel.pipeline_model_parallel_size=2"], "world size 6 is not divisible by tensor x pipeline"),
    (["--nodes", "1", "--gpus-per-node", "2", "parallel.expert_model_parallel_size=4"],
     "world size 2 is not divisible by expert_tensor x expert x pipeline"),
    (["model.num_layerz=3"], "did you mean 'num_layers'"),
    (["--mfu", "1.5"], "--mfu must be in (0, 1]"),
    (["--source-nodes", "0"], "--source-nodes must be >= 1"),
    (["--bandwidth-gib-s", "0"], "--bandwidth-gib-s must be > 0"),
])
def test_impossible_layouts_are_refused(capsys, args, message):
    assert main(["plan", "--config", TINY, *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err
    assert captured.err.startswith("megatron-grow: error:")



@pytest.mark.parametrize("args,message", [
    (["--source-parallel", "pipeline_model_parallel_size=3"], "pipeline_model_parallel_size (3) must divide"),
    (["--source-nodes", "1", "--source-parallel", "expert_model_parallel_size=4"],
     "world size 2 is not divisible by expert_tensor x expert x pipeline"),
])
def test_impossible_source_layouts_are_refused(capsys, args, message):
    """A growth recipe's source layout (the rehearsal's) is checked before any rank is simulated."""
    growth = str(ROOT / "configs" / "growth" / "tiny_depth_width.yaml")
    assert main(["plan", "--config", growth, "--nodes", "1", "--gpus-per-node", "2", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("megatron-grow: error:")
