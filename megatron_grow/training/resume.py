"""What a resume or a ``--grow-from`` does when the recipe and the checkpoint disagree: never silently.

* Architecture (:data:`ARCHITECTURE_FIELDS`): a resume whose recipe model differs from the one the
  checkpoint records is refused, naming every differing field (shape differences would also be
  caught tensor by tensor at load; these checks also catch top-k, RoPE base, norm epsilon ...).
  ``--grow-from`` compares the recipe's ``model:`` with the source the same way
  (``architecture_differences``; the ``--grow-from`` rules are in ``cli/_grow_from.py``).
* Schedule (``training:``'s LR, warmup, decay and weight decay against the loaded scheduler's own
  state, :func:`scheduler_differences`): the recipe's values are applied, as
  Megatron-LM's ``--override-opt_param-scheduler`` does: the scheduler keeps its step count and
  takes the new peak/min LR, warmup, decay style and span (a longer ``train_iters`` extends the
  decay to the new end). Each change is logged with both values.
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_grow.checkpoint import paths
from megatron_grow.checkpoint.manifest import read_checkpoint_info
from megatron_grow.config.layout_rules import padded_vocab_size
from megatron_grow.config.schema import ModelConfig, Recipe
from megatron_grow.errors import CheckpointError
from megatron_grow.training.optimizer import build_scheduler

ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "num_moe_experts",
    "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_score_function",
    "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor", "qk_layernorm", "normalization",
    "layernorm_epsilon", "gated_linear_unit", "add_bias_linear", "vocab_size", "position_embedding_type",
    "rotary_base", "rotary_percent", "untie_embeddings_and_output_weights",
    "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
    "moe_router_num_groups", "moe_router_group_topk",
)


def architecture_differences(recorded: ModelConfig, wanted: ModelConfig) -> list[str]:
    """``field: checkpoint X, recipe Y`` for every architecture field that differs."""
    out = []
    for name in ARCHITECTURE_FIELDS:
        old, new = getattr(recorded, name), getattr(wanted, name)
        if name == "vocab_size" and old in (new, padded_vocab_size(wanted)):
            continue  # Megatron-LM records the padded size
        if old != new:
            out.append(f"{name}: checkpoint {old}, recipe {new}")
    return out


def check_resume_architecture(load_root: str, model: ModelConfig) -> None:
    """Refuse resuming ``load_root`` with a model that is not the one it records."""
    ckpt_dir, iteration = paths.resolve_checkpoint_dir(load_root)
    recorded = read_checkpoint_info(ckpt_dir, iteration).model
    if recorded is None:
        return  # nothing recorded: the tensor-by-tensor check at load is all there is
    diffs = architecture_differences(recorded, model)
    if diffs:
        raise CheckpointError(f"cannot resume {ckpt_dir}: the recipe's model differs from the checkpoint's ("
                              + "; ".join(diffs) + "); fix model: in the recipe or start a new checkpoint.save")


def apply_recipe_schedule(optimizer, scheduler, recipe: Recipe, ckpt_dir: str, iteration: int,
                          log: Callable[[str], None]):
    """After a resume loaded the checkpoint's scheduler: the recipe's schedule values win, logged.

    The schedule started at ``iteration - scheduler.num_steps`` (0, or the growth point); the new
    one spans from there to the recipe's ``train_iters`` with the recipe's LR settings. What is
    compared is the loaded scheduler's own state (the schedule the run was actually following),
    so a checkpoint re-saved by another run compares the same as the original.
    """
    start = iteration - int(scheduler.num_steps)
    state = scheduler.state_dict()
    changes = scheduler_differences(state, recipe, start)
    if not changes:
        return scheduler
    applied = build_scheduler(optimizer, recipe, recipe.training.train_iters - start, override=True,
                              restarted=start > 0)
    # MCore's scheduler reads each param group's own max_lr/min_lr, which the optimizer load restored.
    for group in optimizer.param_groups:
        if "max_lr" in group:
            group["max_lr"], group["min_lr"] = recipe.training.lr, recipe.training.min_lr
    applied.load_state_dict(state)
    what = ", ".join(f"{k} {old} -> {new}" for k, old, new in changes)
    log(f"[train] the recipe's schedule differs from {ckpt_dir}'s; applying the recipe's: {what} "
        f"(schedule from iteration {start} to {recipe.training.train_iters}; LR now "
        f"{optimizer.param_groups[0]['lr']:.3e})")
    return applied


def scheduler_differences(state: dict, recipe: Recipe, start: int) -> list[tuple[str, object, object]]:
    """``(training field, loaded, recipe)`` for every value of a loaded MCore scheduler state (a schedule
    that began at iteration ``start``) that the recipe sets differently; spans are reported as the
    ``train_iters`` they end at (the arithmetic of ``build_scheduler``)."""
    t = recipe.training
    steps = max(t.train_iters - start, 1)
    loaded = {"lr": state.get("max_lr"), "min_lr": state.get("min_lr"),
              "lr_warmup_iters": state.get("lr_warmup_steps"),
              "train_iters": None if state.get("lr_decay_steps") is None else start + state["lr_decay_steps"],
              "lr_decay_style": state.get("lr_decay_style"), "weight_decay": state.get("start_wd")}
    warmup = t.lr_rewarmup_iters if start > 0 and t.lr_rewarmup_iters is not None else t.lr_warmup_iters
    wanted = {"lr": t.lr, "min_lr": t.min_lr, "lr_warmup_iters": min(warmup, steps),
              "train_iters": start + steps, "lr_decay_style": t.lr_decay_style, "weight_decay": t.weight_decay}
    return [(k, loaded[k], v) for k, v in wanted.items() if loaded[k] is not None and loaded[k] != v]
