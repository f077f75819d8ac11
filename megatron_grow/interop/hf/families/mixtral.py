"""Mixtral (``MixtralForCausalLM``): GQA, no QK-norm, softmax top-k always renormalised, no shared expert."""

from __future__ import annotations

from megatron_grow.config.schema import ModelConfig
from megatron_grow.interop.hf.families import base

ARCHITECTURE = "MixtralForCausalLM"
# The few-hundred-kilobyte model of ``interop.hf.tiny`` (tests, worked example), on top of its shared sizes.
TINY_CONFIG = dict(num_local_experts=8, intermediate_size=32, sliding_window=None)


def read_config(hf: dict, where: str) -> dict:
    """Mixtral's ``config.json`` as ``ModelConfig`` fields (``base.Family.read_config``: arguments, refusals)."""
    if hf.get("router_jitter_noise"):
        raise base.refuse(where, "router_jitter_noise > 0 is a training-time perturbation with no Megatron-Core "
                                 "equivalent; set it to 0")
    base.refuse_dense_layers(hf, None, where)
    fields = base.common_read(hf, where)
    fields.update(base.softmax_router_read(hf, where, norm_topk_prob=True))
    fields.update(num_moe_experts=int(base.get(hf, "num_local_experts", where, required=True)),
                  moe_ffn_hidden_size=int(base.get(hf, "intermediate_size", where, required=True)),
                  qk_layernorm=False)
    return fields


def write_config(model: ModelConfig) -> dict:
    """``model`` as Mixtral config fields (``base.Family.write_config``: arguments, refusals)."""
    where = ARCHITECTURE
    if model.qk_layernorm:
        raise base.refuse(where, "model.qk_layernorm=true: Mixtral has no QK-norm")
    base.require_absent(model, where)
    base.refuse_dense_layers({}, model, where)
    out = base.common_write(model, where)
    router = base.softmax_router_write(model, where)
    if not router.pop("norm_topk_prob"):
        raise base.refuse(where, "model.moe_router_pre_softmax=true (top-k weights not renormalised): Mixtral "
                                 "always renormalises the top-k weights")
    out.update(router)
    out.update(num_local_experts=model.num_moe_experts, intermediate_size=model.moe_ffn_hidden_size,
               sliding_window=None, router_jitter_noise=0.0)
    return out


FAMILY = base.Family(ARCHITECTURE, "mixtral",
                     base.Naming(moe_block="block_sparse_moe", expert_proj=("w1", "w3", "w2")),
                     read_config, write_config,
                     "GQA, no QK-norm, softmax top-k renormalised, no shared expert",
                     tiny_config=TINY_CONFIG)
