"""DeepSeek-V2 (``DeepseekV2ForCausalLM``; V2-Lite without a query latent): DeepSeek-V3's multi-latent
attention, routed and shared experts (``deepseek_v3.mla_read``/``mla_write``), with a softmax router.

transformers' DeepSeek-V2 router: a softmax over all experts, the top k of it (``topk_method: greedy``),
weights not renormalised, times ``routed_scaling_factor``: MCore's ``moe_router_pre_softmax`` softmax router
with ``moe_router_topk_scaling_factor``. ``group_limited_greedy`` keeps the ``topk_group`` groups with the
largest *maximum* score; MCore sums a group's top ``k / topk_group`` scores, the same when
``k == topk_group`` (otherwise refused). Its RoPE multiplies consecutive pairs as complex numbers (the
interleaved layout MCore's MLA expects). transformers' class never renormalises the top-k weights, so
``norm_topk_prob`` true (DeepSeek's own code would renormalise) is refused as ambiguous. Dense first layers
are refused as for V3 (``deepseek_v3.DENSE_FIRST_LAYERS_REFUSAL``).
"""

from __future__ import annotations

from megatron_grow.config.schema import ModelConfig
from megatron_grow.interop.hf.families import base, deepseek_v3

ARCHITECTURE = "DeepseekV2ForCausalLM"
# The tiny test model: V3's attention sizes, 4 groups of 2 experts, top-2 within the best 2 groups.
TINY_CONFIG = dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                   v_head_dim=12, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32,
                   intermediate_size=96, num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=4,
                   topk_group=2, first_k_dense_replace=0, routed_scaling_factor=1.5, norm_topk_prob=False)
TOPK_METHODS = ("greedy", "group_limited_greedy")


def _groups_read(hf: dict, topk: int, where: str) -> dict:
    method = hf.get("topk_method") or "greedy"
    if method not in TOPK_METHODS:
        raise base.refuse(where, f"topk_method={method!r}: only {' and '.join(TOPK_METHODS)} map")
    groups, group_topk = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
    if method == "greedy" or groups == 1 or group_topk >= groups:
        return dict(moe_router_num_groups=None, moe_router_group_topk=None)
    if topk != group_topk:
        raise base.refuse(where, f"topk_group={group_topk} with num_experts_per_tok={topk}: transformers ranks "
                                 "groups by their best expert, Megatron-Core by their top num_experts_per_tok/"
                                 "topk_group; they agree only when num_experts_per_tok = topk_group")
    return dict(moe_router_num_groups=groups, moe_router_group_topk=group_topk)


def read_config(hf: dict, where: str) -> dict:
    """DeepSeek-V2's ``config.json`` as ``ModelConfig`` fields (``base.Family.read_config``: arguments, refusals)."""
    for key in ("attention_bias", "mlp_bias", "norm_topk_prob"):
        if hf.get(key):
            raise base.refuse(where, f"{key}=true is not supported for DeepSeek-V2 (transformers' class ignores "
                                     "norm_topk_prob; MCore's MLA and experts have no biases)")
    if int(hf.get("first_k_dense_replace") or 0) > 0:
        raise base.refuse(where, deepseek_v3.DENSE_FIRST_LAYERS_REFUSAL.format(hf["first_k_dense_replace"]))
    if hf.get("num_key_value_heads") not in (None, hf.get("num_attention_heads")):
        raise base.refuse(where, f"num_key_value_heads={hf['num_key_value_heads']}: multi-latent attention has "
                                 "one key/value head per query head")
    fields = deepseek_v3.mla_read(hf, where)
    scaling = fields["moe_router_topk_scaling_factor"]
    fields.update(base.softmax_router_read(hf, where, norm_topk_prob=False), moe_router_topk_scaling_factor=scaling)
    fields.update(_groups_read(hf, fields["moe_router_topk"], where))
    return fields


def write_config(model: ModelConfig) -> dict:
    """``model`` as DeepSeek-V2 config fields (``base.Family.write_config``: arguments, refusals)."""
    where = ARCHITECTURE
    if model.moe_router_score_function != "softmax" or not model.moe_router_pre_softmax \
            or model.moe_router_enable_expert_bias:
        raise base.refuse(where, "DeepseekV2's router is a softmax over all experts, top-k not renormalised, no "
                                 "expert bias (model.moe_router_score_function, moe_router_pre_softmax, "
                                 "moe_router_enable_expert_bias)")
    groups, group_topk = model.moe_router_num_groups, model.moe_router_group_topk
    if groups is not None and model.moe_router_topk != group_topk:
        raise base.refuse(where, f"model.moe_router_group_topk={group_topk} with model.moe_router_topk="
                                 f"{model.moe_router_topk}: transformers ranks groups by their best expert; only "
                                 "moe_router_topk = moe_router_group_topk maps")
    out = deepseek_v3.mla_write(model, where)
    out.update(norm_topk_prob=False, mlp_bias=False, router_aux_loss_coef=model.moe_aux_loss_coeff,
               topk_method="group_limited_greedy" if groups else "greedy", n_group=groups, topk_group=group_topk)
    return out


FAMILY = base.Family(ARCHITECTURE, "deepseek_v2",
                     base.Naming(shared_expert="mlp.shared_experts", always_write_shared_expert=True),
                     read_config, write_config,
                     "multi-latent attention, softmax top-k (not renormalised) x routed_scaling_factor, "
                     "group-limited greedy routing, shared experts",
                     tiny_config=TINY_CONFIG)
