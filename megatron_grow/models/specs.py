"""Layer specs: Megatron-Core's local (pure torch) spec with our norm, or the TE spec.

MCore's local spec uses ``WrappedTorchNorm``, which refuses sequence parallelism, and
MoE with TP > 1 requires sequence parallelism. ``SequenceParallelNorm`` is a plain
RMSNorm/LayerNorm that marks its weight ``sequence_parallel`` so MCore's
``finalize_model_grads`` all-reduces its gradient across TP, exactly as it does for TE norms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_grow.models.experts import GroupedMMExperts


class SequenceParallelNorm(torch.nn.Module):
    """RMSNorm (or LayerNorm) with MCore's norm constructor, usable under sequence parallelism."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.normalization = config.normalization
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in self.parameters():
            # Read by finalize_model_grads: sum this grad over TP ranks under sequence parallelism.
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.weight.shape[0],)
        if self.normalization == "LayerNorm":
            return F.layer_norm(x, shape, self.weight, self.bias, self.eps)
        return F.rms_norm(x, shape, self.weight, self.eps)


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def local_layer_spec(config: TransformerConfig, expert_backend: str = "sequential") -> ModuleSpec:
    """MCore's local spec with our norms; ``expert_backend="grouped_mm"`` swaps SequentialMLP for
    :class:`GroupedMMExperts` (same constructor, same checkpoint layout)."""
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        normalization=config.normalization,
    )
    spec.submodules.input_layernorm = SequenceParallelNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    attn = spec.submodules.self_attention.submodules
    if config.qk_layernorm:
        attn.q_layernorm = SequenceParallelNorm
        attn.k_layernorm = SequenceParallelNorm
    if expert_backend == "grouped_mm":
        _use_grouped_mm_experts(spec)
    return spec


def _use_grouped_mm_experts(layer_spec: ModuleSpec) -> None:
    experts = layer_spec.submodules.mlp.submodules.experts
    if experts.module is not SequentialMLP:
        raise ValueError(f"model.moe_expert_backend=grouped_mm replaces SequentialMLP, but the spec has "
                         f"{experts.module.__name__} (set model.moe_grouped_gemm=false)")
    experts.module = GroupedMMExperts


def decoder_block_spec(config: TransformerConfig, use_te: bool | None = None,
                       vp_stage: int | None = None, expert_backend: str = "sequential") -> TransformerBlockSubmodules:
    """The block spec for ``GPTModel``: TE when it imports on a GPU (or when asked), else local.

    The grouped_mm expert backend is a local-spec module: asking for it selects the local spec."""
    use_te = te_available() if use_te is None else use_te
    if use_te and expert_backend == "sequential":
        layer = get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm)
        from megatron.core.extensions.transformer_engine import TENorm
        final_norm = TENorm
    else:
        layer = local_layer_spec(config, expert_backend)
        final_norm = SequenceParallelNorm
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=final_norm)
