"""GLM-4.5 and GLM-4.5-Air (``Glm4MoeForCausalLM``).

Its router (transformers' ``Glm4MoeTopkRouter``): sigmoid scores; experts chosen by score plus
``e_score_correction_bias``; weights are the unbiased scores of the chosen experts, divided by
their sum (+1e-20) when ``norm_topk_prob``, times ``routed_scaling_factor``. With ``n_group =
topk_group = 1`` the group-limited selection keeps every expert. Megatron-Core's sigmoid router
does exactly this with ``moe_router_enable_expert_bias`` and ``moe_router_topk_scaling_factor``,
except that it always renormalises when k > 1 and never when k = 1: so ``norm_topk_prob`` must be
(k > 1). The first ``first_k_dense_replace`` layers are dense (an MLP ``intermediate_size`` wide,
``model.moe_layer_freq``); ``n_shared_experts`` > 0 is one ungated shared MLP ``n x
moe_intermediate_size`` wide (with 0, transformers builds a zero-width one, which adds exactly 0).
Per-head QK-norm (``use_qk_norm``), no attention bias. The dense-first-layers and shared-expert
mapping is ``base.first_k_dense_read``/``n_shared_experts_read``, which DeepSeek-V2/V3 configs share.
``partial_rotary_factor`` maps onto
``rotary_percent`` (both rotate the leading fraction of each head with the same frequencies).
The multi-token-prediction layers (``num_nextn_predict_layers``) are not run by transformers' causal-LM
class and are not represented: stored in the files, they are refused at import unless ``--drop-mtp``
(``base.check_layers_beyond_the_stack``); export writes ``num_nextn_predict_layers`` 0.
"""

from __future__ import annotations

from megatron_grow.config.schema import ModelConfig
from megatron_grow.interop.hf.families import base

ARCHITECTURE = "Glm4MoeForCausalLM"
# The few-hundred-kilobyte model of ``interop.hf.tiny`` (tests, worked example), on top of its shared sizes.
TINY_CONFIG = dict(head_dim=16, n_routed_experts=8, moe_intermediate_size=32, intermediate_size=96,
            n_shared_experts=0, first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=True,
            routed_scaling_factor=2.5, use_qk_norm=True, partial_rotary_factor=1.0, attention_bias=False)


def read_config(hf: dict, where: str) -> dict:
    """GLM-4.5's ``config.json`` as ``ModelConfig`` fields (``base.Family.read_config``: arguments, refusals)."""
    topk = int(base.get(hf, "num_experts_per_tok", where, required=True))
    checks = {"n_group": 1, "topk_group": 1, "attention_bias": False}
    for key, want in checks.items():
        if hf.get(key, want) not in (want, None):
            raise base.refuse(where, f"{key}={hf[key]}: only {key}={want} is supported "
                                     "(no expert groups, no attention bias)")
    if bool(hf.get("norm_topk_prob", True)) != (topk > 1):
        raise base.refuse(where, f"norm_topk_prob={hf.get('norm_topk_prob')} with num_experts_per_tok={topk}: "
                                 "Megatron-Core's sigmoid router renormalises exactly when k > 1")
    fields = base.common_read(hf, where)
    fields.update(num_moe_experts=int(base.get(hf, "n_routed_experts", where, required=True)),
                  moe_ffn_hidden_size=int(base.get(hf, "moe_intermediate_size", where, required=True)),
                  qk_layernorm=bool(hf.get("use_qk_norm", False)),
                  moe_router_topk=topk, moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
                  moe_router_enable_expert_bias=True,
                  moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
    if fields["moe_router_topk_scaling_factor"] == 1.0:
        fields["moe_router_topk_scaling_factor"] = None
    fields.update(base.first_k_dense_read(hf, where))
    fields.update(base.n_shared_experts_read(hf, where, fields["moe_ffn_hidden_size"]))
    return fields


def write_config(model: ModelConfig) -> dict:
    """``model`` as GLM-4.5 config fields (``base.Family.write_config``: arguments, refusals)."""
    where = ARCHITECTURE
    if model.moe_router_score_function != "sigmoid":
        raise base.refuse(where, "GLM-4.5's router is a sigmoid router; model.moe_router_score_function is "
                                 f"{model.moe_router_score_function}")
    base.require_absent(model, where, shared=True, rotary_full=False)
    out = base.common_write(model, where)
    out["rope_parameters"]["partial_rotary_factor"] = float(model.rotary_percent)
    out.update(base.first_k_dense_write(model, where), **base.n_shared_experts_write(model, where))
    out.update(n_routed_experts=model.num_moe_experts, num_experts_per_tok=model.moe_router_topk,
               moe_intermediate_size=model.moe_ffn_hidden_size, n_group=1, topk_group=1,
               norm_topk_prob=model.moe_router_topk > 1,
               routed_scaling_factor=float(model.moe_router_topk_scaling_factor or 1.0),
               use_qk_norm=model.qk_layernorm, attention_bias=False, num_nextn_predict_layers=0)
    return out


# GLM-4.5's on-disk names, which DeepSeek-V3 (its model code's origin) shares.
NAMING = base.Naming(router_bias="mlp.gate.e_score_correction_bias", shared_expert="mlp.shared_experts",
                     always_write_shared_expert=True)
FAMILY = base.Family(ARCHITECTURE, "glm4_moe", NAMING,
                     read_config, write_config,
                     "the paper's router: sigmoid + expert bias (+ scaling), per-head QK-norm, GQA, "
                     "first_k_dense_replace, n_shared_experts",
                     tiny_config=TINY_CONFIG)
