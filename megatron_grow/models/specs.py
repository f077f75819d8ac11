"""Layer specs: Megatron-Core's local (pure torch) spec with our norm, or the TE spec.

MCore's local spec uses ``WrappedTorchNorm``, which refuses sequence parallelism, and
MoE with TP > 1 requires sequence parallelism. ``SequenceParallelNorm`` is a plain
RMSNorm/LayerNorm that marks its weight ``sequence_parallel`` so MCore's
``finalize_model_grads`` all-reduces its gradient across TP, exactly as it does for TE norms.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig


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
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == "transformer_engine":
            return False  # not installed: the local spec, silently (the CPU case)
        _warn_te_unusable(e)
        return False
    except Exception as e:  # installed but broken (missing CUDA libraries, ABI mismatch, ...)
        _warn_te_unusable(e)
        return False
    return torch.cuda.is_available()


def _warn_te_unusable(e: BaseException) -> None:
    warnings.warn(f"Transformer Engine is installed but failed to import ({type(e).__name__}: {e}); "
                  "using Megatron-Core's local (pure torch) layer spec instead", RuntimeWarning, stacklevel=3)


def local_layer_spec(config: TransformerConfig) -> ModuleSpec:
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
    return spec


def decoder_block_spec(config: TransformerConfig, use_te: bool | None = None,
                       vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The block spec for ``GPTModel``: TE when it imports on a GPU (or when asked), else local."""
    use_te = te_available() if use_te is None else use_te
    if use_te:
        layer = get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm)
        from megatron.core.extensions.transformer_engine import TENorm
        final_norm = TENorm
    else:
        layer = local_layer_spec(config)
        final_norm = SequenceParallelNorm
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=final_norm)
