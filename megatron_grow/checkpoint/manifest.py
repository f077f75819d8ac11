"""What a checkpoint says about itself: architecture, layout, counters and growth lineage.

Stored twice in every checkpoint we write: as ``megatron_grow.json`` (plain JSON, for tools
that should not need torch) and under the ``megatron_grow`` key of the common state
(``common.pt``). Megatron-LM checkpoints have neither; for them the counters come from the
common state's ``iteration`` / ``num_floating_point_operations_so_far`` / ``args``.

Manifest format (``format_version`` 1)::

    {"format_version": 1, "created": ISO time, "recipe": {...whole recipe...},
     "model": {...ModelConfig...}, "layout": {"tp":..,"pp":..,"ep":..,"etp":..,"dp":..,"world_size":..},
     "counters": {"iteration", "consumed_samples", "consumed_tokens", "flops_so_far", "sunk_flops"},
     "lineage": [growth records, oldest first]}

``flops_so_far`` is all training FLOPs behind these weights; ``sunk_flops`` is the part spent
before the most recent growth (0 for a model never grown).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

from megatron_grow.checkpoint import io
from megatron_grow.config.schema import ModelConfig
from megatron_grow.errors import CheckpointError

FORMAT_VERSION = 1
COUNTER_KEYS = ("iteration", "consumed_samples", "consumed_tokens", "flops_so_far", "sunk_flops")


def empty_counters() -> dict:
    return {k: 0 for k in COUNTER_KEYS}


def build_manifest(*, model: ModelConfig, layout: dict, counters: dict, lineage: list,
                   recipe: dict | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "created": io.now(),
        "recipe": recipe or {},
        "model": dataclasses.asdict(model),
        "layout": layout,
        "counters": {k: counters.get(k, 0) for k in COUNTER_KEYS},
        "lineage": list(lineage),
    }


def model_config_from_dict(d: dict, where: str) -> ModelConfig:
    from megatron_grow.config.loader import build_dataclass
    from megatron_grow.errors import ConfigError

    problems: list[str] = []
    cfg = build_dataclass(ModelConfig, d, "model", problems)
    if problems:
        raise ConfigError(problems, source=where)
    return cfg


# Megatron-LM argument names -> ModelConfig fields (identical names are mapped implicitly).
_MEGATRON_ARG_RENAMES = {"padded_vocab_size": "vocab_size", "norm_epsilon": "layernorm_epsilon",
                         "rotary_base": "rotary_base"}


def model_config_from_megatron_args(args: Any) -> ModelConfig:
    """Best-effort architecture from a Megatron-LM ``args`` namespace stored in common.pt."""
    values = vars(args) if not isinstance(args, dict) else dict(args)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    picked = {}
    for key, value in values.items():
        name = _MEGATRON_ARG_RENAMES.get(key, key)
        if name in names and value is not None:
            picked[name] = value
    if picked.get("vocab_size"):
        picked["make_vocab_size_divisible_by"] = 1  # padded_vocab_size is already padded
    if "moe_router_load_balancing_type" in picked and isinstance(picked["moe_router_load_balancing_type"], list):
        picked["moe_router_load_balancing_type"] = picked["moe_router_load_balancing_type"][0]
    for key in ("moe_aux_loss_coeff",):
        if isinstance(picked.get(key), list):
            picked[key] = picked[key][0]
    return model_config_from_dict(picked, "Megatron-LM args in common.pt")


@dataclasses.dataclass
class CheckpointInfo:
    """A checkpoint's self-description, whichever program wrote it."""

    ckpt_dir: str
    iteration: int
    model: ModelConfig | None
    counters: dict
    lineage: list
    layout: dict
    recipe: dict


def read_checkpoint_info(ckpt_dir: str, iteration: int) -> CheckpointInfo:
    manifest = io.read_manifest(ckpt_dir)
    if manifest:
        model = model_config_from_dict(manifest["model"], os.path.join(ckpt_dir, "megatron_grow.json")) \
            if manifest.get("model") else None
        counters = {**empty_counters(), **manifest.get("counters", {})}
        return CheckpointInfo(ckpt_dir, iteration, model, counters, list(manifest.get("lineage", [])),
                              manifest.get("layout", {}), manifest.get("recipe", {}))
    # A Megatron-LM checkpoint: counters and args live in common.pt.
    common = _load_common(ckpt_dir)
    args = common.get("args")
    counters = empty_counters()
    counters["iteration"] = int(common.get("iteration", iteration))
    counters["flops_so_far"] = float(common.get("num_floating_point_operations_so_far", 0) or 0)
    model = None
    if args is not None:
        counters["consumed_samples"] = int(getattr(args, "consumed_train_samples", 0) or 0)
        counters["consumed_tokens"] = counters["consumed_samples"] * int(getattr(args, "seq_length", 0) or 0)
        try:
            model = model_config_from_megatron_args(args)
        except Exception as e:  # the caller asks for --source-config; say why the args did not do
            warnings.warn(f"{ckpt_dir}/common.pt: the architecture in its Megatron-LM args is unusable "
                          f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=2)
            model = None
    return CheckpointInfo(ckpt_dir, iteration, model, counters, [], {}, {})


def _load_common(ckpt_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_common_state_dict(ckpt_dir) or {}
    except Exception as e:
        raise CheckpointError(f"{ckpt_dir}/common.pt is unreadable ({type(e).__name__}: {e})") from None
