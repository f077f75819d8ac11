"""Qwen2-MoE (``Qwen2MoeForCausalLM``): GQA with q/k/v biases, no QK-norm, softmax router, and one
shared expert whose output is scaled by a sigmoid gate (MCore ``moe_shared_expert_gate``); dense layers
(``mlp_only_layers``, ``decoder_sparse_step``) of width ``intermediate_size``."""

from __future__ import annotations

from megatron_grow.config.schema import ModelConfig
from megatron_grow.interop.hf.families import base

ARCHITECTURE = "Qwen2MoeForCausalLM"
# The few-hundred-kilobyte model of ``interop.hf.tiny`` (tests, worked example), on top of its shared sizes.
TINY_CONFIG = dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            intermediate_size=96, norm_topk_prob=False)


def read_config(hf: dict, where: str) -> dict:
    """Qwen2-MoE's ``config.json`` as ``ModelConfig`` fields (``base.Family.read_config``: arguments, refusals)."""
    if not hf.get("qkv_bias", True):
        raise base.refuse(where, "qkv_bias=false is not a Qwen2-MoE variant this converter knows")
    fields = base.common_read(hf, where)
    fields.update(base.softmax_router_read(hf, where, bool(hf.get("norm_topk_prob", False))))
    shared = int(base.get(hf, "shared_expert_intermediate_size", where, 0))
    fields.update(num_moe_experts=base.num_experts(hf, where),
                  moe_ffn_hidden_size=int(base.get(hf, "moe_intermediate_size", where, required=True)),
                  qk_layernorm=False, add_qkv_bias=True,
                  moe_shared_expert_intermediate_size=shared or None, moe_shared_expert_gate=bool(shared))
    fields.update(base.sparse_step_read(hf, where))  # mlp_only_layers / decoder_sparse_step: dense layers
    if not shared:
        raise base.refuse(where, "shared_expert_intermediate_size=0: Qwen2-MoE always has a shared expert")
    return fields


def write_config(model: ModelConfig) -> dict:
    """``model`` as Qwen2-MoE config fields (``base.Family.write_config``: arguments, refusals)."""
    where = ARCHITECTURE
    if model.qk_layernorm:
        raise base.refuse(where, "model.qk_layernorm=true: Qwen2-MoE has no QK-norm")
    if not model.add_qkv_bias:
        raise base.refuse(where, "model.add_qkv_bias=false: Qwen2-MoE has q/k/v biases")
    if not model.moe_shared_expert_intermediate_size or not model.moe_shared_expert_gate:
        raise base.refuse(where, "Qwen2-MoE needs a shared expert with a gate (model.moe_shared_expert_"
                                 "intermediate_size and model.moe_shared_expert_gate)")
    base.require_absent(model, where, shared=True, qkv_bias=True)
    # head_dim is written as is: transformers' Qwen2-MoE attention and RoPE read it (hidden / heads only
    # when absent), so a head_dim != hidden/heads imports and exports alike.
    out = base.common_write(model, where)
    out.update(base.softmax_router_write(model, where))
    out.update(num_experts=model.num_moe_experts, moe_intermediate_size=model.moe_ffn_hidden_size,
               shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
               qkv_bias=True, use_sliding_window=False)
    out.update(base.sparse_step_write(model))
    return out


FAMILY = base.Family(ARCHITECTURE, "qwen2_moe",
                     base.Naming(shared_expert="mlp.shared_expert",
                                 shared_expert_gate="mlp.shared_expert_gate.weight"),
                     read_config, write_config,
                     "GQA with q/k/v bias, softmax top-k, gated shared expert, mlp_only_layers",
                     tiny_config=TINY_CONFIG)
