"""DeepSeek-V3 (``DeepseekV3ForCausalLM``; Moonlight and Kimi-K2 use the same class): multi-latent attention,
a sigmoid router with an expert bias (``e_score_correction_bias``), ``routed_scaling_factor``, grouped routing
(``n_group``/``topk_group``) and ``n_shared_experts`` always-on experts of ``moe_intermediate_size`` each.

How each part maps onto Megatron-Core (0.16.1):

* attention: ``MLASelfAttention`` of MCore's local spec (``model.multi_latent_attention``), tensor for tensor
  (``q_a_proj``/``q_b_proj`` or ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``, the two latent
  norms). MCore's MLA always applies RoPE de-interleaving (``rope_utils._apply_rotary_pos_emb_bshd`` with
  ``multi_latent_attention``): exactly transformers' ``rope_interleave=true``, DeepSeek's own layout, so no
  row is permuted. ``rope_interleave=false`` would need the rotated rows reordered and is refused;
  so are YaRN and other RoPE scalings (``base.rope_settings``).
* router: transformers scores a group by the sum of its top **2** biased scores; MCore by its top
  ``topk / group_topk``. They agree when ``num_experts_per_tok == 2 x topk_group`` (DeepSeek-V3: 8 = 2 x 4),
  or when every group is selected (``topk_group == n_group``, imported as no groups); anything else is refused.
  MCore's sigmoid router renormalises the top-k weights exactly when k > 1, so ``norm_topk_prob`` must be
  ``k > 1``.
* dense first layers (``first_k_dense_replace``, an MLP ``intermediate_size`` wide) and ``n_shared_experts``:
  ``base.first_k_dense_read``/``n_shared_experts_read``, the mapping GLM-4.5 shares.
* not represented, refused in one line: attention biases; multi-token-prediction layers stored in the files
  (``base.check_layers_beyond_the_stack``, at import: ``--drop-mtp`` leaves them out).

DeepSeek-V2 (``DeepseekV2ForCausalLM``) is a different class (softmax router, ``topk_method`` greedy or
group-limited by the group maximum) and is not covered here.
"""

from __future__ import annotations

from megatron_grow.config.schema import ModelConfig
from megatron_grow.interop.hf.families import base, glm4_moe

ARCHITECTURE = "DeepseekV3ForCausalLM"
# The few-hundred-kilobyte model of ``interop.hf.tiny``: MLA with a query latent, 4 groups of 2 experts
# (top-2 of 4 groups, top-4 experts), one shared expert.
TINY_CONFIG = dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                   v_head_dim=12, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32,
                   intermediate_size=96, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=0,
                   num_nextn_predict_layers=0, routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True)
# transformers scores a group by its top-2 experts (DeepseekV3TopkRouter).
HF_GROUP_SCORE_EXPERTS = 2


def _refuse_unmapped(hf: dict, where: str) -> None:
    checks = (("attention_bias", False, "MCore's multi-latent attention has no projection biases"),
              ("rope_interleave", True, "only DeepSeek's interleaved RoPE layout maps onto MCore's MLA"),
              ("scoring_func", "sigmoid", "only the sigmoid router maps"),
              ("topk_method", "noaux_tc", "only the expert-bias (noaux_tc) top-k maps"))
    for key, want, why in checks:
        if hf.get(key, want) not in (want, None):
            raise base.refuse(where, f"{key}={hf[key]}: {why}")
    heads = hf.get("num_attention_heads")
    if hf.get("num_key_value_heads") not in (None, heads):
        raise base.refuse(where, f"num_key_value_heads={hf['num_key_value_heads']}: multi-latent attention has "
                                 f"one key/value head per query head ({heads})")


def _groups_read(hf: dict, topk: int, where: str) -> dict:
    groups, group_topk = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
    if group_topk > groups:
        raise base.refuse(where, f"topk_group={group_topk} exceeds n_group={groups}")
    if groups == 1 or group_topk == groups:  # every group selected: no restriction
        return dict(moe_router_num_groups=None, moe_router_group_topk=None)
    if topk != HF_GROUP_SCORE_EXPERTS * group_topk:
        raise base.refuse(where, f"topk_group={group_topk} with num_experts_per_tok={topk}: transformers scores a "
                                 "group by its top 2 experts, Megatron-Core by its top num_experts_per_tok/topk_group; "
                                 "they agree only when num_experts_per_tok = 2 x topk_group")
    return dict(moe_router_num_groups=groups, moe_router_group_topk=group_topk)


def read_config(hf: dict, where: str) -> dict:
    """DeepSeek-V3's ``config.json`` as ``ModelConfig`` fields (``base.Family.read_config``: arguments, refusals)."""
    _refuse_unmapped(hf, where)
    topk = int(base.get(hf, "num_experts_per_tok", where, required=True))
    if bool(hf.get("norm_topk_prob", True)) != (topk > 1):
        raise base.refuse(where, f"norm_topk_prob={hf.get('norm_topk_prob')} with num_experts_per_tok={topk}: "
                                 "Megatron-Core's sigmoid router renormalises exactly when k > 1")
    fields = base.common_read({**hf, "head_dim": None}, where)
    heads, moe_ffn = fields["num_attention_heads"], int(base.get(hf, "moe_intermediate_size", where, required=True))
    q_lora = hf.get("q_lora_rank")
    fields.update(
        multi_latent_attention=True, q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(base.get(hf, "kv_lora_rank", where, required=True)),
        qk_head_dim=int(base.get(hf, "qk_nope_head_dim", where, required=True)),
        qk_pos_emb_head_dim=int(base.get(hf, "qk_rope_head_dim", where, required=True)),
        v_head_dim=int(base.get(hf, "v_head_dim", where, required=True)),
        num_query_groups=heads, kv_channels=int(hf["v_head_dim"]), qk_layernorm=True,
        num_moe_experts=int(base.get(hf, "n_routed_experts", where, required=True)), moe_ffn_hidden_size=moe_ffn,
        moe_router_topk=topk, moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0) or 1.0))
    if fields["moe_router_topk_scaling_factor"] == 1.0:
        fields["moe_router_topk_scaling_factor"] = None
    fields.update(_groups_read(hf, topk, where))
    fields.update(base.first_k_dense_read(hf, where))
    fields.update(base.n_shared_experts_read(hf, where, moe_ffn))
    return fields


def _groups_write(model: ModelConfig, where: str) -> dict:
    groups, group_topk = model.moe_router_num_groups, model.moe_router_group_topk
    if groups is None:
        return dict(n_group=1, topk_group=1)
    if model.moe_router_topk != HF_GROUP_SCORE_EXPERTS * group_topk:
        raise base.refuse(where, f"model.moe_router_group_topk={group_topk} with model.moe_router_topk="
                                 f"{model.moe_router_topk}: transformers scores a group by its top 2 experts; "
                                 "only moe_router_topk = 2 x moe_router_group_topk maps")
    return dict(n_group=groups, topk_group=group_topk)


def write_config(model: ModelConfig) -> dict:
    """``model`` as DeepSeek-V3 config fields (``base.Family.write_config``: arguments, refusals)."""
    where = ARCHITECTURE
    if not model.multi_latent_attention:
        raise base.refuse(where, "DeepseekV3 has multi-latent attention; model.multi_latent_attention is false")
    if model.moe_router_score_function != "sigmoid" or not model.moe_router_enable_expert_bias:
        raise base.refuse(where, "DeepseekV3's router is a sigmoid router with an expert bias "
                                 "(model.moe_router_score_function, model.moe_router_enable_expert_bias)")
    if not model.qk_layernorm:
        raise base.refuse(where, "model.qk_layernorm=false: DeepseekV3 always normalises its latents")
    base.require_absent(model, where, shared=True, mla=True, grouped=True)
    out = base.common_write(model, where)
    del out["head_dim"]  # transformers sets it to qk_rope_head_dim itself
    out.update(num_key_value_heads=model.num_attention_heads, q_lora_rank=model.q_lora_rank,
               kv_lora_rank=model.kv_lora_rank, qk_nope_head_dim=model.qk_head_dim,
               qk_rope_head_dim=model.qk_pos_emb_head_dim, v_head_dim=model.v_head_dim, rope_interleave=True,
               n_routed_experts=model.num_moe_experts, num_experts_per_tok=model.moe_router_topk,
               moe_intermediate_size=model.moe_ffn_hidden_size, norm_topk_prob=model.moe_router_topk > 1,
               routed_scaling_factor=float(model.moe_router_topk_scaling_factor or 1.0), attention_bias=False,
               num_nextn_predict_layers=0, **_groups_write(model, where))
    out.update(base.first_k_dense_write(model, where), **base.n_shared_experts_write(model, where))
    return out


FAMILY = base.Family(ARCHITECTURE, "deepseek_v3", glm4_moe.NAMING,
                     read_config, write_config,
                     "multi-latent attention, sigmoid router + expert bias (+ scaling), grouped routing, "
                     "shared experts",
                     tiny_config=TINY_CONFIG)
