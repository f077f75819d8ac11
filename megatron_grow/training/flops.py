"""Training FLOPs of the paper's MoE: pure functions over ``ModelConfig`` and a sequence length.

Matmul FLOPs only (2 per multiply-add); norms, softmax, RoPE and activations are ignored.
Training = forward + backward = 3 x forward (backward computes data and weight gradients,
each as large as the forward matmul). Per token, per layer, forward, with H = hidden,
q = heads x kv_channels, g = query groups x kv_channels, s = sequence length,
E = experts, k = top-k, F = expert FFN, S = shared-expert FFN, V = padded vocabulary::

    attention projections   2 H (q + 2g)  +  2 q H          (QKV with GQA, output projection)
    attention scores        2 s q  +  2 s q                  (Q K^T and A V, every key: full, not causal)
    router                  2 H E
    routed experts          k x 3 x 2 H F                    (SwiGLU: gate, up, down; 2 matmuls without GLU)
    shared expert           3 x 2 H S
  in a dense layer of a mixed stack (``model.moe_layer_freq``), instead of router and experts:
    dense MLP               3 x 2 H D                        (D = ffn_hidden_size)
  once per token:
    LM head                 2 H V

    training FLOPs/token  = 3 x (sum over layers of per-layer + LM head)
    training FLOPs/step   = FLOPs/token x global_batch_size x s

With multi-latent attention (n heads, r_q, r_kv latent ranks, d_n, d_r, d_v head widths as in
``models.params``) the attention rows are::

    attention projections   2 (H r_q + r_q n (d_n + d_r) + H (r_kv + d_r) + r_kv n (d_n + d_v) + n d_v H)
                            (2 H n (d_n + d_r) for the query without r_q)
    attention scores        2 s n (d_n + d_r)  +  2 s n d_v   (Q K^T over query/key heads, A V over value heads)

Attention scores are counted over the full s x s matrix, as Megatron-LM's
``num_floating_point_operations`` does (the counter stored in checkpoints and used for the
paper's FLOPs axes, docs/paper.md §7); a causal kernel does about half of that work, pass
``causal=True`` for it. Megatron-LM's counter has no router term: with ``include_router=False``
this module reproduces it exactly (for models without MTP).

Chinchilla reference (docs/paper.md §1.3, §7): ``F_c = 6 N_a (20 N_a) = 120 N_a^2`` with
``N_a`` the activated parameters (the paper's count, both embeddings included).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_grow.config.layout_rules import padded_vocab_size
from megatron_grow.config.schema import ModelConfig, moe_layer_pattern

# fwd + bwd (data grad + weight grad) = 3 x forward.
TRAINING_MULTIPLIER = 3


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs per token by component (already multiplied over layers)."""

    attention_projections: float
    attention_scores: float
    router: float
    experts: float
    shared_expert: float
    lm_head: float
    dense_mlp: float = 0.0   # the MLPs of the dense layers of a mixed stack (model.moe_layer_freq)

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))

    def scaled(self, factor: float) -> FlopsBreakdown:
        return FlopsBreakdown(*(factor * v for v in dataclasses.astuple(self)))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def forward_flops_per_token(model: ModelConfig, seq_length: int | None = None, *, causal: bool = False,
                            include_router: bool = True, tp: int = 1) -> FlopsBreakdown:
    """Forward-pass matmul FLOPs per token; ``tp`` only sets the vocabulary padding of the head."""
    s = model.seq_length if seq_length is None else seq_length
    h, n = model.hidden_size, model.num_layers
    n_moe = sum(moe_layer_pattern(model))  # router and experts only in the MoE layers
    q = model.num_attention_heads * model.kv_channels
    g = model.num_query_groups * model.kv_channels
    matmuls = 3 if model.gated_linear_unit else 2
    shared = model.moe_shared_expert_intermediate_size or 0
    # Causal attention touches s/2 keys per query on average.
    keys = s / 2 if causal else s
    projections, scores = 2 * h * (q + 2 * g) + 2 * q * h, 2 * (2 * keys * q)
    if model.multi_latent_attention:
        projections, scores = _mla_attention_flops(model, keys)
    return FlopsBreakdown(
        attention_projections=n * projections,
        attention_scores=n * scores,
        router=n_moe * 2 * h * model.num_moe_experts if include_router else 0,
        experts=n_moe * model.moe_router_topk * matmuls * 2 * h * model.moe_ffn_hidden_size,
        # the shared expert's MLP and, when gated, its [1, H] sigmoid gate
        shared_expert=n_moe * (matmuls * 2 * h * shared + (2 * h if shared and model.moe_shared_expert_gate else 0)),
        lm_head=2 * h * padded_vocab_size(model, tp),
        dense_mlp=(n - n_moe) * matmuls * 2 * h * (model.ffn_hidden_size or model.moe_ffn_hidden_size),
    )


def _mla_attention_flops(model: ModelConfig, keys: float) -> tuple[float, float]:
    """(projection, score) forward FLOPs per token of one multi-latent attention layer (module docstring)."""
    h, n, r_q, r_kv = model.hidden_size, model.num_attention_heads, model.q_lora_rank, model.kv_lora_rank
    qk, v = n * (model.qk_head_dim + model.qk_pos_emb_head_dim), n * model.v_head_dim
    query = h * r_q + r_q * qk if r_q else h * qk
    key_value = h * (r_kv + model.qk_pos_emb_head_dim) + r_kv * n * (model.qk_head_dim + model.v_head_dim)
    return 2 * (query + key_value + v * h), 2 * keys * qk + 2 * keys * v


def training_flops_per_token(model: ModelConfig, seq_length: int | None = None, *, causal: bool = False,
                             include_router: bool = True, tp: int = 1) -> FlopsBreakdown:
    """Forward + backward FLOPs per token (3 x forward)."""
    fwd = forward_flops_per_token(model, seq_length, causal=causal, include_router=include_router, tp=tp)
    return fwd.scaled(TRAINING_MULTIPLIER)


def training_flops_per_step(model: ModelConfig, global_batch_size: int, seq_length: int | None = None, *,
                            causal: bool = False, include_router: bool = True, tp: int = 1) -> float:
    """Forward + backward FLOPs of one optimizer step of ``global_batch_size`` sequences."""
    s = model.seq_length if seq_length is None else seq_length
    per_token = training_flops_per_token(model, s, causal=causal, include_router=include_router, tp=tp)
    return per_token.total * global_batch_size * s


def chinchilla_flops(activated_params: float) -> float:
    """``F_c = 6 N_a D`` with the Chinchilla-optimal ``D = 20 N_a`` tokens."""
    return 6.0 * activated_params * (20.0 * activated_params)


__all__ = ["FlopsBreakdown", "forward_flops_per_token", "training_flops_per_token",
           "training_flops_per_step", "chinchilla_flops", "TRAINING_MULTIPLIER"]
