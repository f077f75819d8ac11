"""Megatron-LM ``args`` -> ModelConfig and back; spec names; verify thresholds; growth-recipe layouts.

Expected values are written from Megatron-LM's definitions (``megatron/training/arguments.py``:
``kv_channels`` defaults to hidden / heads, ``moe_ffn_hidden_size`` to ``ffn_hidden_size``,
without ``--group-query-attention`` every head is its own group; the vocabulary is padded to a
multiple of ``make_vocab_size_divisible_by`` x TP).
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megatron_grow.checkpoint import keys
from megatron_grow.checkpoint.megatron_args import megatron_args, model_config_from_args
from megatron_grow.config.check import layout_problems
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ModelConfig, ParallelConfig, moe_layer_pattern
from megatron_grow.errors import CheckpointError, LayoutError
from megatron_grow.growth.verify import threshold_failures


def pretrain_gpt_args(**changes) -> dict:
    base = dict(num_layers=4, hidden_size=128, num_attention_heads=8, group_query_attention=True,
                num_query_groups=2, kv_channels=32, ffn_hidden_size=256, num_experts=8, moe_ffn_hidden_size=64,
                moe_router_topk=2, swiglu=True, normalization="RMSNorm", norm_epsilon=1e-5, qk_layernorm=True,
                untie_embeddings_and_output_weights=True, position_embedding_type="rope", rotary_base=500000,
                rotary_percent=1.0, moe_router_score_function="softmax", moe_router_pre_softmax=True,
                moe_router_enable_expert_bias=False, moe_router_topk_scaling_factor=2.5, moe_layer_freq=1,
                moe_router_load_balancing_type=["aux_loss"], moe_aux_loss_coeff=[0.01], add_bias_linear=False,
                padded_vocab_size=50304, vocab_size=None, make_vocab_size_divisible_by=128,
                tensor_model_parallel_size=1, seq_length=4096, max_position_embeddings=4096)
    base.update(changes)
    return base


def test_pretrain_gpt_args_map_field_by_field():
    m = model_config_from_args(argparse.Namespace(**pretrain_gpt_args()))
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels) == (4, 128, 8, 2, 32)
    assert (m.num_moe_experts, m.moe_ffn_hidden_size, m.moe_router_topk) == (8, 64, 2)
    assert (m.moe_router_score_function, m.moe_router_pre_softmax, m.moe_router_topk_scaling_factor) == \
        ("softmax", True, 2.5)
    assert m.moe_router_enable_expert_bias is False
    assert (m.moe_router_load_balancing_type, m.moe_aux_loss_coeff) == ("aux_loss", 0.01)
    assert (m.layernorm_epsilon, m.rotary_base, m.seq_length, m.gated_linear_unit) == (1e-5, 500000, 4096, True)
    # only the padded size is known: it is the vocabulary, padded to itself under any TP
    assert (m.vocab_size, m.make_vocab_size_divisible_by) == (50304, 1)


def test_megatron_defaults_for_unset_arguments():
    m = model_config_from_args(pretrain_gpt_args(group_query_attention=False, kv_channels=None,
                                                 moe_ffn_hidden_size=None, seq_length=None))
    assert m.num_query_groups == 8           # no GQA: one group per head
    assert m.kv_channels == 128 // 8         # hidden / heads
    assert m.moe_ffn_hidden_size == 256      # ffn_hidden_size
    assert m.seq_length == 4096              # max_position_embeddings


def test_vocab_size_and_padding():
    m = model_config_from_args(pretrain_gpt_args(vocab_size=50257, padded_vocab_size=50432,
                                                 tensor_model_parallel_size=2))
    assert (m.vocab_size, m.make_vocab_size_divisible_by) == (50257, 128)   # ceil(50257 / 256) * 256 = 50432
    with pytest.raises(CheckpointError, match=r"args.padded_vocab_size=50304 does not follow"):
        model_config_from_args(pretrain_gpt_args(vocab_size=50257, padded_vocab_size=50304,
                                                 tensor_model_parallel_size=2))


@pytest.mark.parametrize("name,value", [
    ("moe_layer_freq", [0, 1, 2, 1]), ("moe_layer_freq", "__import__('os')"),
    ("mtp_num_layers", 1), ("position_embedding_type", "learned_absolute"), ("add_bias_linear", True),
    ("add_qkv_bias", True), ("swiglu", False), ("num_experts", None), ("num_experts", 0),
    ("qk_l2_norm", True),
    ("window_size", (128, 0)), ("apply_layernorm_1p", True), ("rotary_interleaved", True),
    ("moe_router_load_balancing_type", ["aux_loss", "seq_aux_loss"]), ("normalization", "L2Norm"),
    ("moe_router_score_function", "sqrtsoftplus"),
])
def test_unrepresentable_args_name_argument_and_value(name, value):
    with pytest.raises(CheckpointError) as e:
        model_config_from_args(pretrain_gpt_args(**{name: value}))
    line = str(e.value)
    assert "\n" not in line and f"args.{name}" in line and repr(value if not isinstance(value, tuple)
                                                                else value)[:8] in line


@pytest.mark.parametrize("name,shown", [("swiglu", "False"), ("position_embedding_type", "'learned_absolute'")])
def test_missing_argument_means_megatron_default(name, shown):
    args = pretrain_gpt_args()
    del args[name]
    with pytest.raises(CheckpointError, match=rf"args.{name}={shown} \(missing, so Megatron-LM's default\)"):
        model_config_from_args(args)


@pytest.mark.parametrize("freq, pattern", [
    (2, (1, 0, 1, 0)),                      # an int N: layers 0, N, 2N, ... are MoE
    ([0, 1, 1, 1], (0, 1, 1, 1)),           # a list: one 0/1 per layer
    ("([0]*1+[1]*3)", (0, 1, 1, 1)),        # the command line's list expression
    ("[1]*2+[0]*2", (1, 1, 0, 0)),
])
def test_moe_layer_freq_and_dense_width(freq, pattern):
    m = model_config_from_args(pretrain_gpt_args(moe_layer_freq=freq, moe_shared_expert_intermediate_size=96,
                                                 moe_shared_expert_gate=True, moe_shared_expert_overlap=True))
    assert moe_layer_pattern(m) == pattern
    assert (m.ffn_hidden_size, m.moe_ffn_hidden_size) == (256, 64)    # dense layers --ffn-hidden-size wide
    assert (m.moe_shared_expert_intermediate_size, m.moe_shared_expert_gate) == (96, True)
    again = megatron_args(m, ParallelConfig(), counters={"iteration": 1}, world_size=1)
    assert (again.ffn_hidden_size, again.moe_shared_expert_gate) == (256, True)
    assert model_config_from_args(again) == m
    assert model_config_from_args(pretrain_gpt_args()).ffn_hidden_size is None   # all MoE: no dense width


def test_missing_num_experts_is_a_dense_model():
    args = pretrain_gpt_args()
    del args["num_experts"]
    with pytest.raises(CheckpointError, match="args.num_experts is missing"):
        model_config_from_args(args)


def test_args_we_write_read_back_to_the_same_model():
    model = ModelConfig(num_layers=3, num_moe_experts=16, moe_router_topk=4, vocab_size=1000,
                        make_vocab_size_divisible_by=64, moe_router_pre_softmax=False,
                        moe_router_topk_scaling_factor=1.5, moe_shared_expert_intermediate_size=48)
    for tp in (1, 2, 4):
        args = megatron_args(model, ParallelConfig(tensor_model_parallel_size=tp), counters={"iteration": 7},
                             world_size=4 * tp)
        assert args.padded_vocab_size == -(-1000 // (64 * tp)) * (64 * tp)
        assert (args.num_experts, args.swiglu, args.no_save_rng, args.no_save_optim) == (16, True, True, True)
        assert model_config_from_args(args) == model


def test_mla_and_grouped_routing_args_round_trip_and_refuse_yarn():
    model = ModelConfig(num_moe_experts=8, moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=2,
                        multi_latent_attention=True, q_lora_rank=None, kv_lora_rank=16, qk_head_dim=8,
                        qk_pos_emb_head_dim=8, v_head_dim=12, num_query_groups=4, kv_channels=12)
    args = megatron_args(model, ParallelConfig(), counters={"iteration": 1}, world_size=1)
    assert (args.multi_latent_attention, args.rope_type, args.moe_router_num_groups) == (True, "rope", 4)
    assert model_config_from_args(args) == model
    for rope_type in (None, "yarn"):  # Megatron-LM's MLA without --rope-type is MCore's YaRN default
        with pytest.raises(CheckpointError, match=rf"args.rope_type={rope_type!r} with multi-latent attention"):
            model_config_from_args(argparse.Namespace(**{**vars(args), "rope_type": rope_type}))
    with pytest.raises(CheckpointError, match="args.mscale_all_dim=1.0"):
        model_config_from_args(argparse.Namespace(**{**vars(args), "mscale_all_dim": 1.0,
                                                     "rotary_scaling_factor": 40}))


def test_source_tokenizer_args_are_carried():
    model = ModelConfig(vocab_size=50304, make_vocab_size_divisible_by=1)
    base = argparse.Namespace(tokenizer_type="GPT2BPETokenizer", vocab_file="v.json", vocab_size=None,
                              make_vocab_size_divisible_by=128, num_layers=99)
    args = megatron_args(model, ParallelConfig(), counters={"iteration": 1}, world_size=1, base=base)
    assert (args.tokenizer_type, args.vocab_file, args.make_vocab_size_divisible_by) == ("GPT2BPETokenizer",
                                                                                         "v.json", 128)
    assert args.num_layers == model.num_layers and args.padded_vocab_size == 50304
    assert model_config_from_args(args) == model


def test_spec_names():
    local = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    te = "decoder.layers.pre_mlp_layernorm.weight"
    assert keys.spec_storage_key(local, "local", "te") == te
    assert keys.spec_storage_key(te, "te", "local") == local
    assert keys.spec_storage_key("decoder.layers.mlp.linear_fc1.layer_norm_bias", "local", "te") == \
        "decoder.layers.pre_mlp_layernorm.bias"
    for same in ("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                 "decoder.layers.mlp.experts.experts.linear_fc1.weight", "decoder.layers.mlp.router.weight"):
        assert keys.spec_storage_key(same, "local", "te") == same
    assert keys.storage_spec([te, "x"]) == "te" and keys.storage_spec([local]) == "local"
    assert keys.storage_spec(["x"]) is None
    assert keys.has_singleton_expert_keys(["decoder.layers.mlp.experts.experts.3.linear_fc1.weight"])
    assert not keys.has_singleton_expert_keys(["decoder.layers.mlp.experts.experts.linear_fc1.weight"])


def test_threshold_failures():
    m = {"kl_mean": 0.02, "routing_share_copies": 0.3, "has_copies": True}
    assert threshold_failures(m) == []
    assert threshold_failures(m, max_kl=0.05, min_routing_share=0.25) == []
    assert len(threshold_failures(m, max_kl=0.01)) == 1
    assert len(threshold_failures(m, min_routing_share=0.4)) == 1
    assert len(threshold_failures({**m, "kl_mean": float("nan")}, max_kl=1.0)) == 1   # NaN never passes
    assert len(threshold_failures({**m, "has_copies": False}, min_routing_share=0.1)) == 1


def test_growth_recipe_layout_is_checked_against_the_grown_model():
    recipe = load_recipe("configs/growth/tiny_width.yaml", ["parallel.expert_model_parallel_size=16"])
    assert recipe.model.num_moe_experts == 8 and recipe.parallel.expert_model_parallel_size == 16
    # the CLI flags go through the same function
    from megatron_grow.cli._common import checked_layout

    flags = argparse.Namespace(expert_model_parallel_size=16, tensor_model_parallel_size=None,
                               pipeline_model_parallel_size=None, virtual_pipeline_model_parallel_size=None,
                               expert_tensor_parallel_size=None)
    base = load_recipe("configs/growth/tiny_width.yaml")
    assert checked_layout(flags, base).expert_model_parallel_size == 16
    flags.expert_model_parallel_size = 32
    with pytest.raises(LayoutError, match="expert_model_parallel_size"):
        checked_layout(flags, base)
    assert layout_problems(base, dataclasses.replace(base.parallel, expert_model_parallel_size=32))
