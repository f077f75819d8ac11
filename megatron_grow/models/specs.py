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
from megatron.core import parallel_state as ps
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_grow.models.experts import GroupedMMExperts
from megatron_grow.models.mcore_config import parameter_device


class SequenceParallelNorm(torch.nn.Module):
    """RMSNorm (or LayerNorm) with MCore's norm constructor, usable under sequence parallelism."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.normalization = config.normalization
        self.eps = eps
        # On MCore's device, not the process default (the CPU on a GPU machine).
        device = parameter_device(config)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.bias = None
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype, device=device))
        for p in self.parameters():
            # Read by finalize_model_grads: sum this grad over TP ranks under sequence parallelism.
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.weight.shape[0],)
        if self.normalization == "LayerNorm":
            return F.layer_norm(x, shape, self.weight, self.bias, self.eps)
        return F.rms_norm(x, shape, self.weight, self.eps)


class _SumOverTensorParallel(torch.autograd.Function):
    """All-reduce over TP in forward and backward: every rank's output depends on every rank's input."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class AllHeadsQueryNorm(torch.nn.Module):
    """RMSNorm over all query heads together (OLMoE's QK-norm), not over each head.

    Input ``[s, b, heads/TP, head_dim]``. Under TP each rank holds its heads and their slice of
    the weight (stored TP-sharded along dim 0), and the mean square is summed across TP ranks.
    """

    heads_field = "num_attention_heads"

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()

        tp = config.tensor_model_parallel_size
        heads = getattr(config, self.heads_field) or config.num_attention_heads
        self.local_heads, self.head_dim, self.width = heads // tp, hidden_size, heads * hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.local_heads * hidden_size, dtype=config.params_dtype,
                                                    device=parameter_device(config)))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        square_sum = xf.pow(2).sum(dim=(-2, -1), keepdim=True)
        if ps.get_tensor_model_parallel_world_size() > 1:
            square_sum = _SumOverTensorParallel.apply(square_sum, ps.get_tensor_model_parallel_group())
        y = xf * torch.rsqrt(square_sum / self.width + self.eps)
        return (y * self.weight.float().view(self.local_heads, self.head_dim)).type_as(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


class AllHeadsKeyNorm(AllHeadsQueryNorm):
    heads_field = "num_query_groups"


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401  (lazy: optional dependency, probed here)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == "transformer_engine":
            return False  # not installed: the local spec, silently (the CPU case)
        _warn_te_unusable(e)
        return False
    except Exception as e:  # installed but broken (missing CUDA libraries, ABI mismatch, ...)
        _warn_te_unusable(e)
        return False
    return torch.cuda.is_available()


TE_MODULE_PREFIXES = ("transformer_engine.", "megatron.core.extensions.transformer_engine")


def built_with_te(model_chunks) -> bool:
    """Whether these built chunks hold Transformer Engine modules, i.e. store their tensors under
    the TE spec's names. Read from the model, not from :func:`te_available`: TE may be importable
    while the local spec was chosen (``grouped_mm`` experts, QK-norm across heads)."""
    return any(type(m).__module__.startswith(TE_MODULE_PREFIXES)
               for chunk in model_chunks for m in chunk.modules())


def _warn_te_unusable(e: BaseException) -> None:
    warnings.warn(f"Transformer Engine is installed but failed to import ({type(e).__name__}: {e}); "
                  "using Megatron-Core's local (pure torch) layer spec instead", RuntimeWarning, stacklevel=3)


def local_layer_spec(config: TransformerConfig, expert_backend: str = "sequential",
                     qk_norm_across_heads: bool = False) -> ModuleSpec:
    """MCore's local spec with our norms; ``expert_backend="grouped_mm"`` swaps SequentialMLP for
    :class:`GroupedMMExperts` (same constructor, same checkpoint layout)."""
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=config.multi_latent_attention,
        normalization=config.normalization,
    )
    return _with_our_modules(spec, config, expert_backend, qk_norm_across_heads)


def _with_our_modules(spec: ModuleSpec, config: TransformerConfig, expert_backend: str,
                      qk_norm_across_heads: bool) -> ModuleSpec:
    """A local layer spec (dense or MoE) with our norms and, in an MoE layer, the chosen expert backend."""
    spec.submodules.input_layernorm = SequenceParallelNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    attn = spec.submodules.self_attention.submodules
    if config.multi_latent_attention:
        _use_local_mla_modules(spec)
    elif config.qk_layernorm:
        attn.q_layernorm = AllHeadsQueryNorm if qk_norm_across_heads else SequenceParallelNorm
        attn.k_layernorm = AllHeadsKeyNorm if qk_norm_across_heads else SequenceParallelNorm
    if expert_backend == "grouped_mm" and spec.submodules.mlp.module is MoELayer:
        _use_grouped_mm_experts(spec)
    return spec


class LatentDotProductAttention(DotProductAttention):
    """MCore's local core attention, for multi-latent attention.

    MCore 0.16.1's MLA builds its core attention with ``k_channels``/``v_channels`` (query/key heads
    ``qk_head_dim + qk_pos_emb_head_dim`` wide, value heads ``v_head_dim``), which only TE's attention
    accepts. The local attention already takes the query/key width from its inputs and sizes its output
    by ``kv_channels`` heads, which ``models.mcore_config`` sets to ``v_head_dim`` for MLA.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, **kwargs):
        if v_channels is not None and v_channels != config.kv_channels:
            raise ValueError(f"MLA value heads ({v_channels}) must equal config.kv_channels ({config.kv_channels})")
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, **kwargs)


def _use_local_mla_modules(layer_spec: ModuleSpec) -> None:
    """MCore's local MLA layer with its core attention (above) and norms that work under sequence parallelism,
    storing the pre-MLP norm
    under the name the non-MLA local spec gives it (the MLA spec has no keys map; ``checkpoint.keys``)."""
    attn = layer_spec.submodules.self_attention.submodules
    attn.core_attention = LatentDotProductAttention
    if attn.q_layernorm is not IdentityOp:
        # The latents are whole on every TP rank (sequence-split under SP): a replicated norm.
        attn.q_layernorm = SequenceParallelNorm
        attn.kv_layernorm = SequenceParallelNorm
    layer_spec.submodules.sharded_state_dict_keys_map = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def _use_grouped_mm_experts(layer_spec: ModuleSpec) -> None:
    experts = layer_spec.submodules.mlp.submodules.experts
    if experts.module is not SequentialMLP:
        raise ValueError(f"model.moe_expert_backend=grouped_mm replaces SequentialMLP, but the spec has "
                         f"{experts.module.__name__} (set model.moe_grouped_gemm=false)")
    experts.module = GroupedMMExperts


def decoder_block_spec(config: TransformerConfig, use_te: bool | None = None,
                       vp_stage: int | None = None, expert_backend: str = "sequential",
                       qk_norm_across_heads: bool = False) -> TransformerBlockSubmodules:
    """The block spec for ``GPTModel``: TE when it imports on a GPU (or when asked), else local.

    The grouped_mm expert backend is a local-spec module, ``qk_norm_across_heads`` (OLMoE) has
    no TE module, and multi-latent attention is built with MCore's local MLA spec only (the TE one fuses its
    latent norms into other names): asking for any of them selects the local spec.
    """
    use_te = te_available() if use_te is None else use_te
    use_te = use_te and not (qk_norm_across_heads and config.qk_layernorm) and not config.multi_latent_attention
    if config.moe_layer_freq != 1:
        return _mixed_block_spec(config, vp_stage, expert_backend, qk_norm_across_heads)
    if use_te and expert_backend == "sequential":
        layer = get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm)
        from megatron.core.extensions.transformer_engine import TENorm  # lazy: imports Transformer Engine
        final_norm = TENorm
    else:
        layer = local_layer_spec(config, expert_backend, qk_norm_across_heads)
        final_norm = SequenceParallelNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=final_norm)


def _mixed_block_spec(config: TransformerConfig, vp_stage: int | None, expert_backend: str,
                      qk_norm_across_heads: bool) -> TransformerBlockSubmodules:
    """Dense and MoE layers as ``config.moe_layer_freq`` says, from MCore's own block spec (its layer
    pattern and its per-stage slicing), with our norms and expert backend.

    Always the local spec: under TE a dense layer fuses its pre-MLP norm into ``mlp.linear_fc1`` while an
    MoE layer stores ``pre_mlp_layernorm``, so the two specs' names would differ per layer kind, and the
    checkpoint code renames only the all-MoE stacked names (``checkpoint.keys.spec_storage_key``).
    """
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization,
                                       vp_stage=vp_stage)
    # MCore's list holds one dense and one MoE spec object, each repeated: change each once.
    for layer in {id(spec): spec for spec in block.layer_specs}.values():
        _with_our_modules(layer, config, expert_backend, qk_norm_across_heads)
    return TransformerBlockSubmodules(layer_specs=block.layer_specs, layer_norm=SequenceParallelNorm)
