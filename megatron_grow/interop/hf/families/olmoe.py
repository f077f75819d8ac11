"""OLMoE (``OlmoeForCausalLM``): GQA, QK RMSNorm over *all* heads of each projection together
(``model.qk_layernorm_across_heads``), softmax router, no shared expert."""

from __future__ import annotations

from megatron_grow.config.schema import ModelConfig
from megatron_grow.interop.hf.families import base

ARCHITECTURE = "OlmoeForCausalLM"
# The few-hundred-kilobyte model of ``interop.hf.tiny`` (tests, worked example), on top of its shared sizes.
TINY_CONFIG = dict(num_experts=8, intermediate_size=32, norm_topk_prob=False, clip_qkv=None)


def read_config(hf: dict, where: str) -> dict:
    """OLMoE's ``config.json`` as ``ModelConfig`` fields (``base.Family.read_config``: arguments, refusals)."""
    if hf.get("clip_qkv") is not None:
        raise base.refuse(where, f"clip_qkv={hf['clip_qkv']}: clamping q/k/v has no Megatron-Core equivalent")
    if hf.get("attention_bias"):
        raise base.refuse(where, "attention_bias=true is not supported for OLMoE")
    base.refuse_dense_layers(hf, None, where)
    fields = base.common_read(hf, where)
    if fields["kv_channels"] * fields["num_attention_heads"] != fields["hidden_size"]:
        raise base.refuse(where, "OLMoE's head_dim must be hidden_size / num_attention_heads")
    fields.update(base.softmax_router_read(hf, where, bool(hf.get("norm_topk_prob", False))))
    fields.update(num_moe_experts=base.num_experts(hf, where),
                  moe_ffn_hidden_size=int(base.get(hf, "intermediate_size", where, required=True)),
                  qk_layernorm=True, qk_layernorm_across_heads=True)
    return fields


def write_config(model: ModelConfig) -> dict:
    """``model`` as OLMoE config fields (``base.Family.write_config``: arguments, refusals)."""
    where = ARCHITECTURE
    if not (model.qk_layernorm and model.qk_layernorm_across_heads):
        raise base.refuse(where, "OLMoE normalises queries and keys across all heads "
                                 "(model.qk_layernorm and model.qk_layernorm_across_heads)")
    if model.kv_channels * model.num_attention_heads != model.hidden_size:
        raise base.refuse(where, "OLMoE requires kv_channels x num_attention_heads == hidden_size")
    base.require_absent(model, where)
    base.refuse_dense_layers({}, model, where)
    out = base.common_write(model, where)
    del out["head_dim"]
    out.update(base.softmax_router_write(model, where))
    out.update(num_experts=model.num_moe_experts, intermediate_size=model.moe_ffn_hidden_size, clip_qkv=None,
               attention_bias=False)
    return out


FAMILY = base.Family(ARCHITECTURE, "olmoe", base.Naming(), read_config, write_config,
                     "GQA, QK-norm across all heads, softmax top-k, no shared expert",
                     tiny_config=TINY_CONFIG)
