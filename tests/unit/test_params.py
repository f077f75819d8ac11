"""Parameter counts: closed form vs the real MCore GPTModel on the meta device, and the paper's numbers.

The meta-device builds run in subprocesses (``python -m megatron_grow.models.params``), so the
1-process gloo group they start never meets another test's process group.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_grow.config.layout_rules import resolve_layout
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig, TrainingConfig
from megatron_grow.models.params import count_params, layer_params, memory_per_gpu

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "configs" / "models"
PAPER = ["tiny", "3b", "3b_depth", "6b_width", "17b", "35b", "70b"]

# Architectures off the paper's path, to exercise every branch of the closed form:
# shared expert + LayerNorm + tied embeddings + no qk-norm + padded vocab; no GLU + grouped GEMM
# flag + head dim != hidden/heads; linear biases (router bias included).
MLA = {"multi_latent_attention": True, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_head_dim": 8,
       "qk_pos_emb_head_dim": 8, "v_head_dim": 12}
VARIANTS = {
    "shared_layernorm_tied": {"moe_shared_expert_intermediate_size": 48, "normalization": "LayerNorm",
                              "untie_embeddings_and_output_weights": False, "qk_layernorm": False,
                              "vocab_size": 250},
    "no_glu_grouped": {"gated_linear_unit": False, "moe_grouped_gemm": True, "kv_channels": 24},
    "biases": {"add_bias_linear": True},
    # What Hugging Face imports add: gated shared expert (Qwen2-MoE), q/k/v bias, QK-norm across heads (OLMoE).
    "hf_features": {"moe_shared_expert_intermediate_size": 48, "moe_shared_expert_gate": True, "add_qkv_bias": True,
                    "qk_layernorm_across_heads": True, "moe_router_score_function": "softmax",
                    "moe_router_enable_expert_bias": False, "moe_router_pre_softmax": True},
    # A mixed stack (GLM-4.5 / DeepSeek first dense layers): layer 0 dense with its own MLP width, shared expert.
    "mixed_dense_first": {"moe_layer_freq": [0, 1, 1, 1], "ffn_hidden_size": 80,
                          "moe_shared_expert_intermediate_size": 48},
    # DeepSeek-V3 style: multi-latent attention with a query latent, grouped routing, shared expert; and MLA
    # without a query latent and without latent norms.
    "mla_grouped": {**MLA, "moe_router_num_groups": 4, "moe_router_group_topk": 1,
                    "moe_shared_expert_intermediate_size": 32},
    "mla_no_q_latent": {**MLA, "q_lora_rank": None, "qk_layernorm": False},
}


def _variant_path(tmp: Path, name: str) -> Path:
    lines = [f"include: {MODELS / 'tiny.yaml'}", "model:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in VARIANTS[name].items()]
    path = tmp / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def meta_counts(tmp_path_factory) -> dict:
    """{name: {"analytic": ..., "meta": ...}} for every paper model and variant, built in 2 processes."""
    tmp = tmp_path_factory.mktemp("variants")
    paths = {name: MODELS / f"{name}.yaml" for name in PAPER}
    paths.update({name: _variant_path(tmp, name) for name in VARIANTS})
    # Two balanced groups (70b is ~40% of the build time), one per core.
    groups = [["70b", "3b", "tiny", "3b_depth", "shared_layernorm_tied", "mla_grouped"],
              ["35b", "17b", "6b_width", "no_glu_grouped", "biases", "hf_features", "mixed_dense_first",
               "mla_no_q_latent"]]
    assert sorted(sum(groups, [])) == sorted(paths)
    # Another test may have started a gloo group in this process and exported its rendezvous
    # variables; a child inheriting MASTER_PORT would try to listen on the same port.
    rendezvous = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    procs = [subprocess.Popen([sys.executable, "-m", "megatron_grow.models.params", *(str(paths[n]) for n in g)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for g in groups]
    out = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out.update(json.loads(stdout.strip().splitlines()[-1]))
    by_path = {str(p): n for n, p in paths.items()}
    return {by_path[p]: v for p, v in out.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER + list(VARIANTS))
def test_analytic_count_equals_meta_device_model(meta_counts, name):
    counts = meta_counts[name]
    assert counts["analytic"] == counts["meta"]


def test_tiny_by_hand():
    # H 64, 4 heads x 16 = q 64, 2 groups x 16 = 32 per K and V, 8 experts of F 32, vocab 256.
    m = load_recipe(str(MODELS / "tiny.yaml")).model
    lp = layer_params(m)
    assert lp.attention == 64 * (64 + 2 * 32) + 64 * 64
    assert lp.norms == 2 * 64 and lp.qk_norms == 2 * 16
    assert lp.router == 8 * 64
    assert lp.experts == 8 * (64 * 2 * 32 + 32 * 64)
    c = count_params(m)
    per_layer = 12288 + 128 + 32 + 512 + 49152
    assert c.total == 4 * per_layer + 2 * 256 * 64 + 64
    assert c.activated == c.total - 4 * 6 * (64 * 2 * 32 + 32 * 64)  # 6 of 8 experts idle per layer
    assert c.activated_without_embedding == c.activated - 256 * 64


def test_mixed_stack_by_hand():
    # tiny with layers [dense, MoE, MoE, MoE]: the dense layer has a SwiGLU MLP of width D = 80 and no router or
    # experts; MoE layers have 8 experts of F 32, a shared expert of S 48 (no gate).
    m = dataclasses.replace(load_recipe(str(MODELS / "tiny.yaml")).model, moe_layer_freq=(0, 1, 1, 1),
                            ffn_hidden_size=80, moe_shared_expert_intermediate_size=48)
    attention_and_norms = 64 * (64 + 2 * 32) + 64 * 64 + 2 * 64 + 2 * 16
    dense_layer = attention_and_norms + 64 * 2 * 80 + 80 * 64
    expert = 64 * 2 * 32 + 32 * 64
    moe_layer = attention_and_norms + 8 * 64 + 8 * expert + (64 * 2 * 48 + 48 * 64)
    c = count_params(m)
    assert c.total == dense_layer + 3 * moe_layer + 2 * 256 * 64 + 64
    assert c.expert == 3 * 8 * expert
    assert c.activated == c.total - 3 * 6 * expert   # top-2 of 8 in each of the 3 MoE layers


def test_mla_by_hand():
    # H 64, 4 heads; query latent 24, key/value latent 16, per head 8 (no RoPE) + 8 (RoPE) query/key, 12 value.
    m = dataclasses.replace(load_recipe(str(MODELS / "tiny.yaml")).model, **MLA)
    lp = layer_params(m)
    q_down, q_up = 64 * 24, 24 * 4 * (8 + 8)
    kv_down, kv_up = 64 * (16 + 8), 16 * 4 * (8 + 12)
    out = 4 * 12 * 64
    assert lp.attention == q_down + q_up + kv_down + kv_up + out == 8960
    assert lp.qk_norms == 24 + 16  # the two latent norms replace the per-head q/k norms
    no_latent = layer_params(dataclasses.replace(m, q_lora_rank=None))
    assert no_latent.attention == 64 * 4 * (8 + 8) + kv_down + kv_up + out and no_latent.qk_norms == 16
    assert count_params(m).total - count_params(load_recipe(str(MODELS / "tiny.yaml")).model).total == \
        4 * ((8960 + 40) - (64 * (64 + 2 * 32) + 64 * 64 + 2 * 16))


# Paper numbers (docs/paper.md §4), in billions, all +-0.1B; None where the paper gives none.
PAPER_NUMBERS = {
    # name: (total, activated incl. both embeddings, activated counting only the head)
    "3b": (3.5, 0.70, 0.50),
    "3b_depth": (6.7, 1.0, None),
    "6b_width": (6.56, 0.9, None),
    "17b": (18.0, 2.1, 1.7),
    "35b": (35.2, 3.5, None),
    "70b": (69.0, 5.6, None),
}


@pytest.mark.parametrize("name", sorted(PAPER_NUMBERS))
def test_paper_parameter_counts(name):
    total, active, active_head_only = PAPER_NUMBERS[name]
    c = count_params(load_recipe(str(MODELS / f"{name}.yaml")).model)
    assert abs(c.total / 1e9 - total) <= 0.1
    assert abs(c.activated / 1e9 - active) <= 0.1
    if active_head_only is not None:
        assert abs(c.activated_without_embedding / 1e9 - active_head_only) <= 0.1


def test_exact_counts_from_the_megatron_logs():
    # The authors' size-test log (docs/paper.md §4): the 128-expert top-8 3B-family model has 6,557,054,976 parameters.
    assert count_params(load_recipe(str(MODELS / "6b_width.yaml")).model).total == 6_557_054_976
    # The authors' 17B launch log: 1,118,692,352 non-expert parameters; experts 28 x 96 x 3 x 2048 x 1024.
    c17 = count_params(load_recipe(str(MODELS / "17b.yaml")).model)
    assert c17.non_expert == 1_118_692_352
    assert c17.expert == 28 * 96 * 3 * 2048 * 1024


def test_growth_changes_counts_as_the_operators_say():
    c3 = count_params(load_recipe(str(MODELS / "3b.yaml")).model)
    depth = count_params(load_recipe(str(MODELS / "3b_depth.yaml")).model)
    width = count_params(load_recipe(str(MODELS / "6b_width.yaml")).model)
    outside_layers = c3.embedding + c3.output_layer + c3.final_norm
    assert depth.total - outside_layers == 2 * (c3.total - outside_layers)  # layers doubled
    assert width.expert == 2 * c3.expert
    assert width.non_expert - c3.non_expert == 20 * 64 * 1024  # only the router grows


def test_tp_padding_changes_only_the_vocabulary():
    m = load_recipe(str(MODELS / "17b.yaml")).model
    assert count_params(m, tp=2).total == count_params(m).total  # 200064 = 1563 x 128
    padded = 200192  # next multiple of 64 x 4
    assert count_params(m, tp=4).total - count_params(m).total == 2 * (padded - 200064) * 2048


def test_memory_single_gpu_is_bytes_per_parameter():
    m = load_recipe(str(MODELS / "tiny.yaml")).model
    training = TrainingConfig(micro_batch_size=1, global_batch_size=1, bf16=True)
    est = memory_per_gpu(m, ParallelConfig(), training, resolve_layout(ParallelConfig(), 1))
    c = count_params(m)
    assert est.dense_params + est.expert_params == c.total
    assert est.weights == 2 * c.total and est.grads == 4 * c.total and est.optimizer == 12 * c.total


def test_memory_sharding_over_ep_and_dp():
    m = load_recipe(str(MODELS / "17b.yaml")).model
    training = TrainingConfig(micro_batch_size=1, global_batch_size=1024)
    parallel = ParallelConfig(expert_model_parallel_size=8)
    one_node = memory_per_gpu(m, parallel, training, resolve_layout(parallel, 8))
    two_nodes = memory_per_gpu(m, parallel, training, resolve_layout(parallel, 16))
    c = count_params(m)
    assert one_node.expert_params == c.expert / 8
    # Experts' Adam state shards over expert-DP (1 -> 2), dense state over DP (8 -> 16).
    assert one_node.optimizer - two_nodes.optimizer == pytest.approx(
        12 * (c.expert / 8 / 2 + c.non_expert / 16))
    assert one_node.weights == two_nodes.weights
