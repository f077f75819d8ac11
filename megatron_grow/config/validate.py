"""Cross-section rules: the checks that need more than one field."""

from __future__ import annotations

from megatron_grow.config.schema import Recipe
from megatron_grow.parallel.topology import model_layout_problems


def check_recipe(recipe: Recipe) -> list[str]:
    m, t = recipe.model, recipe.training
    out = []
    if m.num_attention_heads % m.num_query_groups:
        out.append(f"model.num_query_groups ({m.num_query_groups}) must divide model.num_attention_heads "
                   f"({m.num_attention_heads})")
    if m.moe_router_topk > m.num_moe_experts:
        out.append(f"model.moe_router_topk ({m.moe_router_topk}) must be <= model.num_moe_experts "
                   f"({m.num_moe_experts})")
    if m.kv_channels % 2:
        out.append(f"model.kv_channels ({m.kv_channels}) must be even for RoPE")
    if t.min_lr > t.lr:
        out.append(f"training.min_lr ({t.min_lr}) must be <= training.lr ({t.lr})")
    if t.global_batch_size % t.micro_batch_size:
        out.append(f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
                   f"training.micro_batch_size ({t.micro_batch_size})")
    if t.lr_decay_style == "WSD" and t.lr_warmup_iters + t.lr_wsd_decay_iters > t.train_iters:
        out.append(f"training.lr_warmup_iters + training.lr_wsd_decay_iters ({t.lr_warmup_iters} + "
                   f"{t.lr_wsd_decay_iters}) must not exceed training.train_iters ({t.train_iters})")
    out.extend(model_layout_problems(m, recipe.parallel))
    expert_tp = recipe.parallel.expert_tensor_parallel_size or recipe.parallel.tensor_model_parallel_size
    out.extend(expert_backend_problems(m.moe_expert_backend, m.hidden_size, m.moe_ffn_hidden_size, expert_tp,
                                       m.add_bias_linear, m.moe_grouped_gemm))
    if recipe.growth is not None:
        from megatron_grow.growth.plan import growth_problems

        out.extend(growth_problems(recipe.growth, m))
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
