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
    if recipe.growth is not None:
        from megatron_grow.growth.plan import growth_problems

        out.extend(growth_problems(recipe.growth, m))
    return out
