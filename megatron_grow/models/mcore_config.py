"""The one translation point from our ``model:``/``parallel:`` sections to Megatron-Core.

``ModelConfig`` field names are ``TransformerConfig`` names, so this is a pass-through
plus the settings the paper's architecture fixes (SwiGLU, fp32 router)
and the ones the platform forces (no fused kernels, fp32 on CPU).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_grow.config.layout_rules import expert_tensor_parallel_size, sequence_parallel_enabled
from megatron_grow.config.schema import ModelConfig, ParallelConfig

# ModelConfig fields that are GPTModel arguments or our own, not TransformerConfig fields.
NON_TRANSFORMER_FIELDS = {
    "vocab_size", "make_vocab_size_divisible_by", "seq_length", "position_embedding_type",
    "rotary_base", "rotary_percent", "untie_embeddings_and_output_weights", "moe_expert_backend",
    "qk_layernorm_across_heads",  # a choice of norm module (models.specs), not a TransformerConfig field
    "moe_layer_freq", "ffn_hidden_size",  # passed below: list form, and the dense width's default
}
# MLATransformerConfig fields: passed only when model.multi_latent_attention is on.
MLA_FIELDS = {"q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"}


def _attention_config(model: ModelConfig) -> tuple[type, dict]:
    """The config class and the attention fields: MLA's own RoPE lives in its config (MLA does not use
    GPTModel's rotary embedding), plain RoPE only (``rope_type="rope"``; YaRN is not offered). The scaling
    factor 1 keeps MLA's softmax scale at 1/sqrt(qk_head_dim + qk_pos_emb_head_dim). The recipe's
    num_query_groups and kv_channels do not apply to MLA and are replaced."""
    if not model.multi_latent_attention:
        return TransformerConfig, {}
    fields = {name: getattr(model, name) for name in MLA_FIELDS}
    fields.update(rope_type="rope", rotary_base=model.rotary_base, rotary_percent=model.rotary_percent,
                  rotary_scaling_factor=1.0,
                  # Every head has its own keys and values; the local core attention sizes its output by
                  # kv_channels heads (models.specs.LatentDotProductAttention).
                  num_query_groups=model.num_attention_heads, kv_channels=model.v_head_dim)
    return MLATransformerConfig, fields


def parameter_device(config: TransformerConfig) -> torch.device | None:
    """Where MCore's own layers allocate their weights for ``config``, for our modules to follow:
    ``torch.cuda.current_device()`` on its GPU path; the ambient default device (``None``) with
    ``use_cpu_initialization`` or under a ``meta`` device context (parameter counting, growth)."""
    if config.use_cpu_initialization or torch.empty(0).is_meta:
        return None
    return torch.cuda.current_device()


def to_transformer_config(model: ModelConfig, parallel: ParallelConfig | None = None,
                          params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """Map the recipe's model and parallel sections onto MCore's ``TransformerConfig``."""
    parallel = parallel or ParallelConfig()
    passthrough = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
                   if f.name not in NON_TRANSFORMER_FIELDS | MLA_FIELDS}
    config_class, attention = _attention_config(model)
    passthrough.update(attention)
    if passthrough["moe_router_load_balancing_type"] == "none":
        passthrough["moe_router_load_balancing_type"] = "none"
        passthrough["moe_aux_loss_coeff"] = 0.0
    bf16 = params_dtype == torch.bfloat16
    return config_class(
        **passthrough,
        ffn_hidden_size=model.ffn_hidden_size or model.moe_ffn_hidden_size,
        # MCore reads a pattern only as a list (get_gpt_decoder_layer_specs); 1: every layer MoE.
        moe_layer_freq=list(model.moe_layer_freq) if isinstance(model.moe_layer_freq, tuple) else model.moe_layer_freq,
        activation_func=F.silu,  # SwiGLU with gated_linear_unit=True
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size(parallel),
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=sequence_parallel_enabled(parallel),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        # Fused kernels need CUDA/TE; the local spec runs unfused everywhere.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
