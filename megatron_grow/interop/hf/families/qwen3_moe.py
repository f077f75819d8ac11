"""Qwen3-MoE (``Qwen3MoeForCausalLM``): GQA, per-head QK RMSNorm, softmax router, no shared expert; dense
layers (``mlp_only_layers``, ``decoder_sparse_step``) of width ``intermediate_size``.

The closest open architecture to the paper's (which routes with a sigmoid and an expert bias).
"""

from __future__ import annotations

from megatron_grow.config.schema import ModelConfig
from megatron_grow.interop.hf.families import base

ARCHITECTURE = "Qwen3MoeForCausalLM"
# The few-hundred-kilobyte model of ``interop.hf.tiny`` (tests, worked example), on top of its shared sizes.
TINY_CONFIG = dict(head_dim=16, num_experts=8, moe_intermediate_size=32, intermediate_size=96,
            norm_topk_prob=True, rope_theta=1000000.0)


def read_config(hf: dict, where: str) -> dict:
    """Qwen3-MoE's ``config.json`` as ``ModelConfig`` fields (``base.Family.read_config``: arguments, refusals)."""
    if hf.get("attention_bias"):
        raise base.refuse(where, "attention_bias=true is not supported for Qwen3-MoE")
    fields = base.common_read(hf, where)
    if fields["rotary_percent"] != 1.0:
        raise base.refuse(where, "partial_rotary_factor != 1 is not part of Qwen3-MoE")
    fields.update(base.softmax_router_read(hf, where, bool(hf.get("norm_topk_prob", False))))
    fields.update(num_moe_experts=base.num_experts(hf, where),
                  moe_ffn_hidden_size=int(base.get(hf, "moe_intermediate_size", where, required=True)),
                  qk_layernorm=True)
    fields.update(base.sparse_step_read(hf, where))  # mlp_only_layers / decoder_sparse_step: dense layers
    return fields


def write_config(model: ModelConfig) -> dict:
    """``model`` as Qwen3-MoE config fields (``base.Family.write_config``: arguments, refusals)."""
    where = ARCHITECTURE
    if not model.qk_layernorm:
        raise base.refuse(where, "model.qk_layernorm=false: Qwen3-MoE always normalises queries and keys")
    base.require_absent(model, where)
    out = base.common_write(model, where)
    out.update(base.softmax_router_write(model, where))
    out.update(num_experts=model.num_moe_experts, moe_intermediate_size=model.moe_ffn_hidden_size,
               attention_bias=False, use_sliding_window=False)
    out.update(base.sparse_step_write(model))
    return out


FAMILY = base.Family(ARCHITECTURE, "qwen3_moe", base.Naming(), read_config, write_config,
                     "GQA, per-head QK-norm, softmax top-k (norm_topk_prob either way), no shared expert, "
                     "mlp_only_layers",
                     tiny_config=TINY_CONFIG)
