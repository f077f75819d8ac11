"""The one answer to "what model is in this checkpoint?", for every command that reads one.

In order:

1. an explicit ``--source-config RECIPE.yaml`` (its ``model:`` section), when given;
2. ``megatron_grow.json`` next to the shards (every checkpoint megatron-grow writes);
3. Megatron-LM's ``args`` namespace in ``common.pt`` (what ``pretrain_gpt.py`` writes),
   mapped by :mod:`megatron_grow.checkpoint.megatron_args`, which refuses what the model
   cannot represent with one line naming the argument and its value.

``grow``, ``verify``, ``train --grow-from`` and resume, ``inspect``, ``weight-norms``, ``flops``
and ``advise`` all come here (the analysis commands through ``manifest.read_checkpoint_info``).
"""

from __future__ import annotations

import os

from megatron_grow.checkpoint import io, paths
from megatron_grow.checkpoint.integrity import read_error_text
from megatron_grow.checkpoint.megatron_args import model_config_from_args
from megatron_grow.config.loader import build_dataclass, load_recipe
from megatron_grow.config.schema import ModelConfig
from megatron_grow.errors import CheckpointError, ConfigError


def model_config_from_dict(d: dict, where: str) -> ModelConfig:
    """A ``ModelConfig`` from a recorded mapping (a manifest or a lineage record), checked like a recipe.

    Args:
        d: the recorded ``model:`` mapping.
        where: the file it came from, named in the error.

    Returns:
        The model configuration.

    Raises:
        ConfigError: listing every problem of ``d`` (unknown keys, bad values).
    """
    problems: list[str] = []
    cfg = build_dataclass(ModelConfig, d, "model", problems)
    if problems:
        raise ConfigError(problems, source=where)
    return cfg


def load_common_state(ckpt_dir: str) -> dict:
    """``common.pt`` (the non-sharded entries) of a torch_dist checkpoint.

    Args:
        ckpt_dir: an ``iter_NNNNNNN`` directory.

    Returns:
        Its common state dict (empty when the file holds none).

    Raises:
        CheckpointError: the file is unreadable.
    """
    from megatron.core import dist_checkpointing  # here, not at import: the manifest path never needs it

    try:
        return dist_checkpointing.load_common_state_dict(ckpt_dir) or {}
    except Exception as e:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"{ckpt_dir}/common.pt is unreadable ({read_error_text(e)})") from None


def recorded_architecture(ckpt_dir: str, manifest: dict | None = None,
                          common: dict | None = None) -> tuple[ModelConfig | None, str]:
    """What the checkpoint itself records (steps 2 and 3); ``(None, reason)`` when it records nothing.

    Args:
        ckpt_dir: an ``iter_NNNNNNN`` directory.
        manifest: its manifest, when the caller has read it already.
        common: its common state, when the caller has read it already.

    Returns:
        ``(model, where)``: the model configuration and the file it was read from, or ``(None, why)``.
    """
    manifest = io.read_manifest(ckpt_dir) if manifest is None else manifest
    if manifest.get("model"):
        where = os.path.join(ckpt_dir, paths.MANIFEST_FILENAME)
        return model_config_from_dict(manifest["model"], where), where
    common = load_common_state(ckpt_dir) if common is None else common
    args = common.get("args")
    if args is not None:
        where = f"Megatron-LM args in {os.path.join(ckpt_dir, 'common.pt')}"
        return model_config_from_args(args, where), where
    return None, f"{ckpt_dir} has neither {paths.MANIFEST_FILENAME} nor Megatron-LM args in common.pt"


def resolve_architecture(ckpt_dir: str, source_config: str | ModelConfig | None = None) -> tuple[ModelConfig, str]:
    """The checkpoint's architecture and where it was read from (for messages), in the module's order.

    Args:
        ckpt_dir: an ``iter_NNNNNNN`` directory.
        source_config: a recipe path (``--source-config``) or a ``ModelConfig`` that overrides what
            the checkpoint records; None to use the record.

    Returns:
        ``(model, where)``.

    Raises:
        CheckpointError: nothing describes the architecture.
    """
    if isinstance(source_config, ModelConfig):
        return source_config, "the given source model"
    if source_config:
        return load_recipe(source_config).model, f"--source-config {source_config}"
    model, where = recorded_architecture(ckpt_dir)
    if model is None:
        raise CheckpointError(f"{where}: its architecture is unknown; pass --source-config with a recipe whose "
                              "model: section describes it")
    return model, where
