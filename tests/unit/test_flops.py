"""FLOPs accounting against hand arithmetic and Megatron-LM's classic counter formula."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_grow.config.loader import load_recipe
from megatron_grow.models.params import count_params
from megatron_grow.training.flops import (
    chinchilla_flops,
    forward_flops_per_token,
    training_flops_per_step,
    training_flops_per_token,
)

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"


def _model(name: str):
    return load_recipe(str(MODELS / f"{name}.yaml")).model


def test_tiny_by_hand():
    # H 64, 4 layers, q = 4 x 16 = 64, K and V 2 x 16 = 32 each, s 64, E 8, k 2, F 32, V 256.
    fwd = forward_flops_per_token(_model("tiny"))
    assert fwd.attention_projections == 4 * (2 * 64 * (64 + 32 + 32) + 2 * 64 * 64)
    assert fwd.attention_scores == 4 * (2 * 64 * 64 + 2 * 64 * 64)  # QK^T and AV over all 64 keys
    assert fwd.router == 4 * 2 * 64 * 8
    assert fwd.experts == 4 * 2 * (3 * 2 * 64 * 32)  # 2 experts x 3 SwiGLU matmuls
    assert fwd.shared_expert == 0
    assert fwd.lm_head == 2 * 64 * 256
    assert fwd.total == 299_008
    train = training_flops_per_token(_model("tiny"))
    assert train.total == 3 * 299_008
    assert training_flops_per_step(_model("tiny"), global_batch_size=8) == 3 * 299_008 * 8 * 64


def test_mixed_stack_by_hand():
    # tiny with layers [dense, MoE, dense, MoE] (moe_layer_freq 2): router, routed and shared experts (S 48) in 2
    # layers; a SwiGLU MLP of width D 80 in the other 2; attention in all 4.
    m = dataclasses.replace(_model("tiny"), moe_layer_freq=2, ffn_hidden_size=80,
                            moe_shared_expert_intermediate_size=48)
    fwd = forward_flops_per_token(m)
    assert fwd.attention_projections == 4 * (2 * 64 * (64 + 32 + 32) + 2 * 64 * 64)
    assert fwd.router == 2 * 2 * 64 * 8
    assert fwd.experts == 2 * 2 * (3 * 2 * 64 * 32)
    assert fwd.shared_expert == 2 * 3 * 2 * 64 * 48
    assert fwd.dense_mlp == 2 * 3 * 2 * 64 * 80
    assert fwd.total == fwd.attention_projections + fwd.attention_scores + fwd.router + fwd.experts + \
        fwd.shared_expert + fwd.dense_mlp + 2 * 64 * 256


def test_mla_by_hand():
    # H 64, 4 layers, 4 heads, s 64; latents r_q 24, r_kv 16; per head 8 + 8 (RoPE) query/key, 12 value.
    m = dataclasses.replace(_model("tiny"), multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16,
                            qk_head_dim=8, qk_pos_emb_head_dim=8, v_head_dim=12)
    fwd = forward_flops_per_token(m)
    weights = 64 * 24 + 24 * 64 + 64 * 24 + 16 * 80 + 48 * 64  # q down/up, kv down/up, output
    assert fwd.attention_projections == 4 * 2 * weights
    assert fwd.attention_scores == 4 * (2 * 64 * 4 * 16 + 2 * 64 * 4 * 12)  # QK^T over 16-wide, AV over 12-wide heads
    assert forward_flops_per_token(m, causal=True).attention_scores == fwd.attention_scores / 2
    plain = forward_flops_per_token(_model("tiny"))
    assert (fwd.router, fwd.experts, fwd.lm_head) == (plain.router, plain.experts, plain.lm_head)


def megatron_classic_flops_per_token(m, s: int) -> float:
    """Megatron-LM ``num_floating_point_operations`` / (batch x seq), MoE every layer, no MTP."""
    h, n = m.hidden_size, m.num_layers
    q_ratio = m.kv_channels * m.num_attention_heads / h
    attn = (1 + m.num_query_groups / m.num_attention_heads + s / h) * q_ratio
    mlp = m.moe_ffn_hidden_size / h * m.moe_router_topk * 3 / 2
    return 12 * s * n * h * h * (attn + mlp) / s + 6 * h * 200064


@pytest.mark.parametrize("name", ["3b", "17b", "70b"])
def test_without_router_matches_megatron_counter(name):
    m = _model(name)
    ours = training_flops_per_token(m, include_router=False).total
    assert ours == pytest.approx(megatron_classic_flops_per_token(m, 4096), rel=1e-12)
    with_router = training_flops_per_token(m).total
    assert with_router - ours == pytest.approx(3 * m.num_layers * 2 * m.hidden_size * m.num_moe_experts)


def test_causal_halves_only_the_scores():
    m = _model("17b")
    full, causal = forward_flops_per_token(m), forward_flops_per_token(m, causal=True)
    assert causal.attention_scores == full.attention_scores / 2
    assert full.total - causal.total == full.attention_scores / 2


def test_seq_length_argument_overrides_recipe():
    m = _model("17b")
    assert forward_flops_per_token(m, 8192).attention_scores == 2 * forward_flops_per_token(m).attention_scores


def test_width_growth_adds_k_swiglu_experts_per_layer():
    # docs/paper.md §7: width growth with 2k adds k x 3 x (2 H F) forward FLOPs per layer (+ router).
    base, wide = forward_flops_per_token(_model("3b")), forward_flops_per_token(_model("6b_width"))
    assert wide.experts - base.experts == 20 * 4 * 3 * 2 * 1024 * 768
    assert wide.router - base.router == 20 * 2 * 1024 * 64


def test_matmul_flops_match_six_times_activated_params_without_attention_scores():
    # Every weight matrix is a 2-FLOP multiply-add per token in forward, x3 for training.
    # Norms are not matmuls: their parameters are the only difference. The input embedding
    # is a lookup, not a matmul, so the activated count without it is the right N.
    m = _model("17b")
    train = training_flops_per_token(m)
    c = count_params(m)
    norms = m.num_layers * (2 * m.hidden_size + 2 * m.kv_channels) + m.hidden_size
    assert train.total - train.attention_scores == 6 * (c.activated_without_embedding - norms)


def test_chinchilla_reference_from_the_paper():
    assert chinchilla_flops(0.7e9) == pytest.approx(5.88e19)  # 3B: stated F_c
    assert chinchilla_flops(2.1e9) == pytest.approx(5.3e20, rel=0.01)  # 17B: F_c ~ 5.3e20
