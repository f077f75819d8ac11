"""Cross-section rules: the checks that need more than one field of a recipe.

In a growth recipe, ``model:`` is the *source* and ``parallel:`` describes the run that
holds the *grown* model, so the layout is checked against :func:`built_model` (the model
that will actually be built), here and for command-line layout flags alike
(:func:`layout_problems`).
"""

from __future__ import annotations

from megatron_grow.config.growth_rules import grown_model, growth_problems
from megatron_grow.config.layout_rules import expert_tensor_parallel_size, model_layout_problems
from megatron_grow.config.schema import ModelConfig, ParallelConfig, Recipe, moe_layer_problems


def built_model(recipe: Recipe) -> ModelConfig:
    """The architecture a run of ``recipe`` builds: the grown model when it grows, else ``model:``."""
    if recipe.growth is None or growth_problems(recipe.growth, recipe.model):
        return recipe.model
    return grown_model(recipe.model, recipe.growth)


def layout_problems(recipe: Recipe, parallel: ParallelConfig | None = None) -> list[str]:
    """Problems of ``parallel`` (default: the recipe's) against the model the recipe builds."""
    return model_layout_problems(built_model(recipe), parallel if parallel is not None else recipe.parallel)


def model_problems(m: ModelConfig) -> list[str]:
    """The rules between the fields of one architecture, one line each naming its keys."""
    out = []
    if not m.multi_latent_attention and m.num_attention_heads % m.num_query_groups:
        out.append(f"model.num_query_groups ({m.num_query_groups}) must divide model.num_attention_heads "
                   f"({m.num_attention_heads})")
    if m.moe_router_topk > m.num_moe_experts:
        out.append(f"model.moe_router_topk ({m.moe_router_topk}) must be <= model.num_moe_experts "
                   f"({m.num_moe_experts})")
    if not m.multi_latent_attention and m.kv_channels % 2:
        out.append(f"model.kv_channels ({m.kv_channels}) must be even for RoPE")
    return out + moe_layer_problems(m) + _mla_problems(m) + grouped_routing_problems(m)


def _mla_problems(m: ModelConfig) -> list[str]:
    if not m.multi_latent_attention:
        return []
    out = []
    if m.qk_pos_emb_head_dim % 2:
        out.append(f"model.qk_pos_emb_head_dim ({m.qk_pos_emb_head_dim}) must be even for RoPE")
    for name in ("add_qkv_bias", "qk_layernorm_across_heads"):
        if getattr(m, name):
            out.append(f"model.{name}=true has no multi-latent-attention counterpart (model.multi_latent_attention)")
    if m.rotary_percent != 1.0:
        out.append(f"model.rotary_percent ({m.rotary_percent}) must be 1 with model.multi_latent_attention: "
                   "qk_pos_emb_head_dim is the rotated part")
    return out


def grouped_routing_problems(m: ModelConfig) -> list[str]:
    """What Megatron-Core's group-limited top-k (``moe_utils.group_limited_topk``) needs of the model."""
    groups, group_topk = m.moe_router_num_groups, m.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        return [f"model.moe_router_num_groups ({groups}) and model.moe_router_group_topk ({group_topk}) must be set "
                "together (or both null)"]
    if groups is None:
        return []
    if m.num_moe_experts % groups:
        return [f"model.moe_router_num_groups ({groups}) must divide model.num_moe_experts ({m.num_moe_experts})"]
    out = []
    if group_topk > groups:
        out.append(f"model.moe_router_group_topk ({group_topk}) must be <= model.moe_router_num_groups ({groups})")
    if m.moe_router_topk % group_topk:
        out.append(f"model.moe_router_group_topk ({group_topk}) must divide model.moe_router_topk "
                   f"({m.moe_router_topk}): each group is scored by its top topk/group_topk experts")
    elif m.moe_router_topk // group_topk > m.num_moe_experts // groups:
        out.append(f"model.moe_router_topk / model.moe_router_group_topk ({m.moe_router_topk // group_topk}) must "
                   f"be <= the experts per group ({m.num_moe_experts // groups})")
    return out


# grouped_mm needs 16-byte aligned strides: 8 bf16 (or 4 fp32) elements; 8 covers both.
GROUPED_MM_ALIGNMENT = 8


def expert_backend_problems(backend: str, hidden_size: int, ffn_hidden_size: int, expert_tp: int,
                            add_bias_linear: bool, moe_grouped_gemm: bool = False) -> list[str]:
    """Why the ``grouped_mm`` expert backend cannot run this model (empty when it can)."""
    if backend != "grouped_mm":
        return []
    problems = []
    if add_bias_linear:
        problems.append("model.moe_expert_backend: grouped_mm has no linear biases; set model.add_bias_linear=false "
                        "or model.moe_expert_backend=sequential")
    if moe_grouped_gemm:
        problems.append("model.moe_expert_backend: grouped_mm replaces MCore's grouped GEMM experts; set "
                        "model.moe_grouped_gemm=false")
    local_ffn = ffn_hidden_size // max(expert_tp, 1)
    for name, value in (("model.hidden_size", hidden_size), ("model.moe_ffn_hidden_size / expert TP", local_ffn)):
        if value % GROUPED_MM_ALIGNMENT:
            problems.append(f"model.moe_expert_backend: grouped_mm needs {name} to be a multiple of "
                            f"{GROUPED_MM_ALIGNMENT} (16-byte aligned grouped GEMM), got {value}")
    return problems


def _training_problems(recipe: Recipe) -> list[str]:
    t = recipe.training
    out = []
    if t.min_lr > t.lr:
        out.append(f"training.min_lr ({t.min_lr}) must be <= training.lr ({t.lr})")
    if t.global_batch_size % t.micro_batch_size:
        out.append(f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
                   f"training.micro_batch_size ({t.micro_batch_size})")
    per_eval = t.eval_iters * t.global_batch_size
    if recipe.data.eval_samples is not None and recipe.data.eval_samples < per_eval:
        out.append(f"data.eval_samples ({recipe.data.eval_samples}) must be >= training.eval_iters * "
                   f"training.global_batch_size ({per_eval}): every evaluation reads that many samples")
    if t.lr_decay_style == "WSD" and t.lr_warmup_iters + t.lr_wsd_decay_iters > t.train_iters:
        out.append(f"training.lr_warmup_iters + training.lr_wsd_decay_iters ({t.lr_warmup_iters} + "
                   f"{t.lr_wsd_decay_iters}) must not exceed training.train_iters ({t.train_iters})")
    return out


def check_recipe(recipe: Recipe) -> list[str]:
    """Every cross-section problem of ``recipe``, one line each naming its key."""
    out = model_problems(recipe.model) + _training_problems(recipe)
    if recipe.growth is not None:
        out.extend(growth_problems(recipe.growth, recipe.model))
    out.extend(layout_problems(recipe))
    m = recipe.model
    out.extend(expert_backend_problems(m.moe_expert_backend, m.hidden_size, m.moe_ffn_hidden_size,
                                       expert_tensor_parallel_size(recipe.parallel), m.add_bias_linear,
                                       m.moe_grouped_gemm))
    return out
