"""The one translation point from our ``model:``/``parallel:`` sections to Megatron-Core.

``ModelConfig`` field names are ``TransformerConfig`` names, so this is a pass-through
plus the settings the paper's architecture fixes (SwiGLU, fp32 router)
and the ones the platform forces (no fused kernels, fp32 on CPU).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_grow.config.layout_rules import expert_tensor_parallel_size, sequence_parallel_enabled
from megatron_grow.config.schema import ModelConfig, ParallelConfig

# ModelConfig fields that are GPTModel arguments or our own, not TransformerConfig fields.
NON_TRANSFORMER_FIELDS = {
    "vocab_size", "make_vocab_size_divisible_by", "seq_length", "position_embedding_type",
    "rotary_base", "rotary_percent", "untie_embeddings_and_output_weights", "moe_expert_backend",
    "qk_layernorm_across_heads",  # a choice of norm module (models.specs), not a TransformerConfig field
    "moe_layer_freq", "ffn_hidden_size",  # passed below: list form, and the dense width's default
}


def padded_vocab_size(model: ModelConfig, tp: int = 1) -> int:
    """Megatron-LM's padding: round up to a multiple of make_vocab_size_divisible_by x TP."""
    multiple = model.make_vocab_size_divisible_by * tp
    return -(-model.vocab_size // multiple) * multiple


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
                   if f.name not in NON_TRANSFORMER_FIELDS}
    if passthrough["moe_router_load_balancing_type"] == "none":
        passthrough["moe_router_load_balancing_type"] = "none"
        passthrough["moe_aux_loss_coeff"] = 0.0
    bf16 = params_dtype == torch.bfloat16
    return TransformerConfig(
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
