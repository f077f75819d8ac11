"""Parameter counts of the paper's MoE, two independent ways, plus per-GPU training memory.

1. :func:`count_params` is closed-form arithmetic over ``ModelConfig`` (what ``plan`` uses;
   instant for any size).
2. :func:`count_params_meta` builds the real Megatron-Core ``GPTModel`` on the meta device
   (no memory, no weight init) and sums ``named_parameters()``. Tests hold the two equal.

What counts (per decoder layer, H = hidden, q = heads x kv_channels, g = query groups,
d = kv_channels, E = experts, F = expert FFN, S = shared-expert FFN, V = padded vocab)::

    input_layernorm, pre_mlp_layernorm    H each (2H each for LayerNorm: weight + bias)
    linear_qkv                            H x (q + 2 g d)       (+ q + 2 g d bias)
    q_layernorm, k_layernorm              d each (per-head norm; only with qk_layernorm)
    linear_proj                           q x H                 (+ H bias)
    router                                E x H                 (+ E bias; expert_bias is a buffer: not counted)
    routed experts                        E x (H x 2F + F x H)  (SwiGLU: fc1 = gate+up; 1F without GLU)
    shared expert                         H x 2S + S x H        (none in the paper)
  a dense layer (``model.moe_layer_freq``) has, instead of router and experts:
    dense MLP                             H x 2D + D x H        (D = ffn_hidden_size)
  plus final_layernorm H, input embedding V x H and an untied output layer V x H.

With multi-latent attention (n heads, r_q = q_lora_rank, r_kv = kv_lora_rank, d_n = qk_head_dim,
d_r = qk_pos_emb_head_dim, d_v = v_head_dim), linear_qkv and the q/k norms are replaced by::

    linear_q_down_proj, linear_q_up_proj  H x r_q + r_q x n (d_n + d_r)   (H x n (d_n + d_r) without r_q)
    linear_kv_down_proj                   H x (r_kv + d_r)
    linear_kv_up_proj                     r_kv x n (d_n + d_v)
    linear_proj                           n d_v x H
    q_layernorm, kv_layernorm             r_q + r_kv (only with qk_layernorm; no q norm without r_q)

Activated parameters follow the paper (docs/paper.md §4, Switch-Transformer convention):
every non-expert parameter plus the top-k routed experts of each layer. The paper's
headline numbers (17B -> "2.1B activated") **include both the input embedding and the
output layer**: that is :attr:`ParamCounts.activated`. "17B-A1.7B" in its Fig. 2 counts
only the output layer: :attr:`ParamCounts.activated_without_embedding`. The output layer
is always counted as activated (it is a dense matmul for every token).

Memory (:func:`memory_per_gpu`) is an estimate for one GPU of the most loaded pipeline
stage; its docstring gives the formula.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass

import torch

from megatron_grow.config.layout_rules import Layout, padded_vocab_size
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ModelConfig, ParallelConfig, TrainingConfig, moe_layer_pattern
from megatron_grow.models.builder import build_gpt_model
from megatron_grow.parallel.init import initialize_distributed
from megatron_grow.platform import cpu


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one decoder layer, split the way they are sharded."""

    norms: int            # input + pre-MLP norms (replicated over TP)
    qk_norms: int         # q/k layernorms over the head dim (replicated over TP)
    attention: int        # linear_qkv + linear_proj (sharded over TP)
    router: int           # router weight (replicated over TP)
    experts: int          # all routed experts (sharded over EP x ETP)
    expert_single: int    # one routed expert
    shared_expert: int    # shared expert (sharded over TP)
    dense_mlp: int = 0    # the MLP of a dense layer (model.moe_layer_freq; sharded over TP)

    @property
    def non_expert(self) -> int:
        return self.norms + self.qk_norms + self.attention + self.router + self.shared_expert + self.dense_mlp

    @property
    def total(self) -> int:
        return self.non_expert + self.experts


@dataclass(frozen=True)
class ParamCounts:
    """Whole-model parameter counts. ``activated`` is the paper's convention (both embeddings)."""

    total: int
    embedding: int          # input word embedding
    output_layer: int       # LM head; 0 when tied to the embedding
    final_norm: int
    layers: int             # all decoder layers
    expert: int             # all routed experts, all layers
    non_expert: int         # total - expert (embeddings, head, attention, norms, router, shared expert)
    activated: int          # non_expert + top-k experts per layer: the paper's "activated" (17B -> 2.1B)
    activated_without_embedding: int  # activated - input embedding (17B -> 1.7B, "17B-A1.7B")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def mla_attention_params(model: ModelConfig) -> tuple[int, int]:
    """(projection weights, latent norm weights) of one multi-latent attention block (module docstring)."""
    h, n, r_q, r_kv = model.hidden_size, model.num_attention_heads, model.q_lora_rank, model.kv_lora_rank
    qk = n * (model.qk_head_dim + model.qk_pos_emb_head_dim)
    query = h * r_q + r_q * qk if r_q else h * qk
    key_value = h * (r_kv + model.qk_pos_emb_head_dim) + r_kv * n * (model.qk_head_dim + model.v_head_dim)
    norms = (r_q or 0) + r_kv if model.qk_layernorm else 0
    return query + key_value + n * model.v_head_dim * h, norms


def layer_params(model: ModelConfig, moe: bool = True) -> LayerParams:
    """Closed-form parameter count of one decoder layer (see the module docstring); ``moe=False``: a
    dense layer of a mixed stack (its MLP ``ffn_hidden_size`` wide, no router and no experts)."""
    h, d = model.hidden_size, model.kv_channels
    q, kv = model.num_attention_heads * d, 2 * model.num_query_groups * d
    norm = 2 if model.normalization == "LayerNorm" else 1  # LayerNorm has a bias
    bias = 1 if model.add_bias_linear else 0
    glu = 2 if model.gated_linear_unit else 1

    def mlp(ffn: int) -> int:
        return h * glu * ffn + ffn * h + bias * (glu * ffn + h)

    qkv_bias = 1 if (model.add_bias_linear or model.add_qkv_bias) else 0
    attention = h * (q + kv) + qkv_bias * (q + kv) + q * h + bias * h
    shared = model.moe_shared_expert_intermediate_size
    shared_gate = h if shared and model.moe_shared_expert_gate else 0  # [1, H] sigmoid gate
    # OLMoE-style QK-norm spans all query (key) heads; the per-head one is one head wide.
    qk_norm_width = (q + kv // 2) if model.qk_layernorm_across_heads else 2 * d
    expert = mlp(model.moe_ffn_hidden_size)
    qk_norms = norm * qk_norm_width if model.qk_layernorm else 0
    if model.multi_latent_attention:
        attention, qk_norms = mla_attention_params(model)
        qk_norms *= norm
    if not moe:
        return LayerParams(norms=2 * norm * h, qk_norms=qk_norms, attention=attention, router=0, experts=0,
                           expert_single=0, shared_expert=0,
                           dense_mlp=mlp(model.ffn_hidden_size or model.moe_ffn_hidden_size))
    return LayerParams(
        norms=2 * norm * h,
        qk_norms=qk_norms,
        attention=attention,
        router=model.num_moe_experts * (h + bias),
        experts=model.num_moe_experts * expert,
        expert_single=expert,
        shared_expert=(mlp(shared) + shared_gate) if shared else 0,
    )


def count_params(model: ModelConfig, tp: int = 1) -> ParamCounts:
    """Analytic counts of the full (unsharded) model; ``tp`` only affects vocabulary padding."""
    lp, dense = layer_params(model), layer_params(model, moe=False)
    h = model.hidden_size
    n = sum(moe_layer_pattern(model))  # MoE layers; the rest are dense
    vocab = padded_vocab_size(model, tp)
    embedding = vocab * h
    output = vocab * h if model.untie_embeddings_and_output_weights else 0
    final_norm = h * (2 if model.normalization == "LayerNorm" else 1)
    layers = n * lp.total + (model.num_layers - n) * dense.total
    expert = n * lp.experts
    total = embedding + output + final_norm + layers
    non_expert = total - expert
    activated = non_expert + n * model.moe_router_topk * lp.expert_single
    return ParamCounts(total=total, embedding=embedding, output_layer=output, final_norm=final_norm,
                       layers=layers, expert=expert, non_expert=non_expert, activated=activated,
                       activated_without_embedding=activated - embedding)


def count_params_meta(model: ModelConfig) -> ParamCounts:
    """Build the MCore ``GPTModel`` on the meta device in this process and count its parameters.

    Needs a single-process world: starts a 1-process gloo group (``initialize_distributed``)
    if none exists and (re)initialises MCore parallel state to TP = PP = EP = 1, so call it
    from a process of its own (tests do, through ``python -m megatron_grow.models.params``).
    """
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != 1:
        raise RuntimeError("count_params_meta needs a single-process world")
    parallel = ParallelConfig()
    initialize_distributed(parallel)
    # Grouped GEMM changes the tensor layout of the experts, not their size; the per-expert
    # local spec builds on any machine.
    model = dataclasses.replace(model, moe_grouped_gemm=False, moe_expert_backend="sequential")
    gpt = build_gpt_model(model, parallel, pre_process=True, post_process=True, use_te=False, meta=True)
    sums = {"embedding": 0, "output": 0, "final_norm": 0, "layers": 0, "other": 0}
    expert_total = 0
    active_expert = 0
    for name, p in gpt.named_parameters():
        numel = p.numel()
        if name.startswith("embedding."):
            sums["embedding"] += numel
        elif name.startswith("output_layer."):
            sums["output"] += numel
        elif name.startswith("decoder.final_layernorm."):
            sums["final_norm"] += numel
        elif name.startswith("decoder.layers."):
            sums["layers"] += numel
            if ".mlp.experts." in name:
                expert_total += numel
                # local_experts.<i>: the first top-k experts stand in for any k of them.
                idx = int(name.split(".mlp.experts.local_experts.")[1].split(".")[0])
                if idx < model.moe_router_topk:
                    active_expert += numel
        else:
            sums["other"] += numel
    if sums["other"]:
        raise RuntimeError(f"unclassified parameters in GPTModel: {sums['other']}")
    total = sum(sums.values())
    non_expert = total - expert_total
    activated = non_expert + active_expert
    return ParamCounts(total=total, embedding=sums["embedding"], output_layer=sums["output"],
                       final_norm=sums["final_norm"], layers=sums["layers"], expert=expert_total,
                       non_expert=non_expert, activated=activated,
                       activated_without_embedding=activated - sums["embedding"])


# ---------------------------------------------------------------------------------------------
# Memory per GPU

GIB = 1024 ** 3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU of the most loaded pipeline stage (``stage``: 'first', 'last' or 'only')."""

    stage: str
    dense_params: float      # non-expert parameters on this GPU
    expert_params: float     # routed-expert parameters on this GPU
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits

    def breakdown_gib(self) -> dict:
        return {"weights": self.weights / GIB, "grads": self.grads / GIB, "optimizer": self.optimizer / GIB,
                "activations": self.activations / GIB, "logits": self.logits / GIB}


def activation_elements_per_token(model: ModelConfig) -> float:
    """bf16 elements one layer keeps for backward per token (flash attention, no s^2 term).

    Attention: norm input and output (2H), QKV output (q + 2gd), q/k before their norms
    (q + gd), attention output (q). MoE: norm input and output (2H), router logits and
    scores in fp32 (2E, counted as 4E bf16 elements), and per routed copy (k of them) the
    permuted input (H), fc1 output (2F), SwiGLU output (F) and fc2 output (H). Shared expert:
    fc1 output, activation, fc2 output (3S + H).
    """
    h, d = model.hidden_size, model.kv_channels
    q, g = model.num_attention_heads * d, model.num_query_groups * d
    f, k = model.moe_ffn_hidden_size, model.moe_router_topk
    glu = 2 if model.gated_linear_unit else 1
    attention = 2 * h + (q + 2 * g) + (q + g) + q
    if model.multi_latent_attention:
        attention = 2 * h + _mla_activation_elements(model)
    moe = 2 * h + 4 * model.num_moe_experts + k * (2 * h + (glu + 1) * f)
    s = model.moe_shared_expert_intermediate_size or 0
    shared = (glu + 1) * s + h if s else 0
    return attention + moe + shared


def _mla_activation_elements(model: ModelConfig) -> int:
    """Multi-latent attention keeps its latents (r_q, r_kv + d_r, before and after their norms), the
    up-projected queries and keys/values (n (d_n + d_r), n (d_n + d_v)), the assembled keys
    (n (d_n + d_r)) and the attention output (n d_v)."""
    n, dn, dr, dv = model.num_attention_heads, model.qk_head_dim, model.qk_pos_emb_head_dim, model.v_head_dim
    latents = 2 * ((model.q_lora_rank or 0) + model.kv_lora_rank) + dr
    return latents + n * (dn + dr) + n * (dn + dv) + n * (dn + dr) + n * dv


def memory_per_gpu(model: ModelConfig, parallel: ParallelConfig, training: TrainingConfig,
                   layout: Layout) -> MemoryEstimate:
    """Training memory on one GPU, Megatron-LM style (bf16 + fp32 main grads + distributed optimizer).

    Parameters on a GPU of a stage holding ``L/pp`` layers: TP-sharded tensors (attention,
    shared expert, embedding/head) / tp; norms and router replicated; routed experts /
    (ep x etp). The first stage holds the input embedding, the last the head and final norm
    (one stage with pp = 1). Bytes per parameter::

        weights    2 (bf16; 4 with bf16 off)
        grads      4 (fp32 main grads, a full copy on every rank)
        optimizer  12 / shard  (fp32 master + Adam m + v; 8 without bf16, no master copy)
                   shard = dp x cp for dense, expert_dp for routed experts
                   (1 without the distributed optimizer)

    Activations per layer: ``activation_elements_per_token x 2 bytes x s x b / (tp x cp)``
    (sequence parallelism shards every activation over TP). Under 1F1B the first stage keeps
    ``min(pp, micro batches)`` micro batches in flight, the last one (the extra held by
    interleaved schedules is ignored). With full recompute a
    layer keeps only its input (``H`` elements per token) plus one layer's full working set
    during recomputation; selective recompute is treated as none (flash attention stores no
    s^2 scores already). Logits on the last stage: ``s x b x V / tp x 6`` bytes (bf16 logits
    and their fp32 softmax). Not included: CUDA context, NCCL buffers, allocator
    fragmentation, MoE dispatch buffers; leave 5-10 GiB of headroom.
    """
    layers_per_stage = model.num_layers // layout.pp
    stored_layer, working, logits = _activation_bytes(model, training, layout)
    dense_layer, expert_layer = _params_per_layer_on_gpu(model, layout)
    wbytes = 2 if training.bf16 else 4
    opt_bytes = 12 if training.bf16 else 8
    dense_shard = layout.dp * layout.cp if parallel.use_distributed_optimizer else 1
    expert_shard = layout.expert_dp if parallel.use_distributed_optimizer else 1
    best: MemoryEstimate | None = None
    for name, extra_dense, in_flight, stage_logits in _pipeline_stages(model, parallel, training, layout, logits):
        dense = layers_per_stage * dense_layer + extra_dense
        expert = layers_per_stage * expert_layer
        est = MemoryEstimate(
            stage=name, dense_params=dense, expert_params=expert,
            weights=wbytes * (dense + expert),
            grads=4 * (dense + expert),
            optimizer=opt_bytes * (dense / dense_shard + expert / expert_shard),
            activations=in_flight * layers_per_stage * stored_layer + working,
            logits=stage_logits,
        )
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


def _params_per_layer_on_gpu(model: ModelConfig, layout: Layout) -> tuple[float, float]:
    """(dense, routed-expert) parameters of one layer on one GPU."""
    lp = layer_params(model)
    dense_layer = lp.norms + lp.qk_norms + lp.router + (lp.attention + lp.shared_expert) / layout.tp
    return dense_layer, lp.experts / (layout.ep * layout.etp)


def _activation_bytes(model: ModelConfig, training: TrainingConfig, layout: Layout) -> tuple[float, float, float]:
    """(stored bytes per layer per micro batch, recompute working set, logits bytes on the last stage)."""
    tp, cp, h = layout.tp, layout.cp, model.hidden_size
    mbs, s = training.micro_batch_size, model.seq_length
    tokens = s * mbs / (tp * cp)
    full_layer = activation_elements_per_token(model) * 2 * tokens
    if training.recompute_granularity == "full":
        stored_layer, working = h * 2 * tokens, full_layer
    else:
        stored_layer, working = full_layer, 0.0
    vocab = padded_vocab_size(model, tp)
    # The head gathers the sequence back from sequence parallelism and shards the vocabulary.
    logits = s * mbs / cp * vocab / tp * 6
    return stored_layer, working, logits


def _pipeline_stages(model: ModelConfig, parallel: ParallelConfig, training: TrainingConfig, layout: Layout,
                     logits: float) -> list[tuple[str, float, int, float]]:
    """(stage, non-layer parameters it holds, micro batches in flight, logits bytes) per distinct stage."""
    h = model.hidden_size
    emb = padded_vocab_size(model, parallel.tensor_model_parallel_size) * h / layout.tp
    head = emb if model.untie_embeddings_and_output_weights else 0
    final_norm = h * (2 if model.normalization == "LayerNorm" else 1)
    if layout.pp == 1:
        return [("only", emb + head + final_norm, 1, logits)]
    n_micro = max(1, training.global_batch_size // (training.micro_batch_size * layout.dp))
    return [("first", emb, min(layout.pp, n_micro), 0.0),
            ("last", head + final_norm + (emb if not head else 0), 1, logits)]


def _main(argv: list | None = None) -> int:
    """``python -m megatron_grow.models.params RECIPE.yaml ...``: analytic and meta counts as JSON."""
    cpu.apply_cpu_adaptations()  # an entry point (tests run it as a process of its own)
    out = {}
    for path in (argv if argv is not None else sys.argv[1:]):
        model = load_recipe(path).model
        out[path] = {"analytic": count_params(model).as_dict(), "meta": count_params_meta(model).as_dict()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())


__all__ = ["LayerParams", "ParamCounts", "MemoryEstimate", "layer_params", "count_params",
           "count_params_meta", "activation_elements_per_token", "memory_per_gpu", "GIB", "mla_attention_params"]
