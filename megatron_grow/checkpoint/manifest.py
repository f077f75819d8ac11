"""What a checkpoint says about itself: architecture, layout, counters and growth lineage.

Stored twice in every checkpoint we write: as ``megatron_grow.json`` (plain JSON, for tools
that should not need torch) and under the ``megatron_grow`` key of the common state
(``common.pt``). Megatron-LM checkpoints have neither; for them the counters come from the
common state's ``iteration`` / ``num_floating_point_operations_so_far`` / ``args``, and the
architecture from ``args`` (see ``checkpoint.architecture``).

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

from megatron_grow.checkpoint import io
from megatron_grow.checkpoint.architecture import load_common_state, recorded_architecture, resolve_architecture
from megatron_grow.config.schema import ModelConfig

FORMAT_VERSION = 1
COUNTER_KEYS = ("iteration", "consumed_samples", "consumed_tokens", "flops_so_far", "sunk_flops")


def empty_counters() -> dict:
    """The counters of a run that has not trained yet.

    Returns:
        ``{counter: 0}`` for every name in :data:`COUNTER_KEYS`.
    """
    return {k: 0 for k in COUNTER_KEYS}


def build_manifest(*, model: ModelConfig, layout: dict, counters: dict, lineage: list,
                   recipe: dict | None = None) -> dict:
    """The ``megatron_grow.json`` record written next to a checkpoint's shards.

    Args:
        model: the architecture.
        layout: the parallel layout that wrote it (sizes per axis).
        counters: the run's counters (only :data:`COUNTER_KEYS` are kept).
        lineage: the growth and training history, oldest first.
        recipe: the recipe that produced it, as a plain mapping.

    Returns:
        The manifest, a JSON-ready dict with :data:`FORMAT_VERSION` and a creation time.
    """
    return {
        "format_version": FORMAT_VERSION,
        "created": io.now(),
        "recipe": recipe or {},
        "model": dataclasses.asdict(model),
        "layout": layout,
        "counters": {k: counters.get(k, 0) for k in COUNTER_KEYS},
        "lineage": list(lineage),
    }


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


def read_checkpoint_info(ckpt_dir: str, iteration: int,
                         source_config: str | ModelConfig | None = None) -> CheckpointInfo:
    """Counters, lineage and the architecture, resolved as :mod:`checkpoint.architecture` does.

    Args:
        ckpt_dir: an ``iter_NNNNNNN`` directory.
        iteration: its iteration.
        source_config: a recipe path or ``ModelConfig`` that overrides the recorded architecture.

    Returns:
        The checkpoint's :class:`CheckpointInfo`; its ``model`` is None when nothing describes it
        (unsupported Megatron-LM args raise unless ``source_config`` overrides them).
    """
    manifest = io.read_manifest(ckpt_dir)
    if manifest:
        model = _architecture(ckpt_dir, source_config, manifest, None)
        counters = {**empty_counters(), **manifest.get("counters", {})}
        return CheckpointInfo(ckpt_dir, iteration, model, counters, list(manifest.get("lineage", [])),
                              manifest.get("layout", {}), manifest.get("recipe", {}))
    # A Megatron-LM checkpoint: counters and args live in common.pt.
    common = load_common_state(ckpt_dir)
    args = common.get("args")
    counters = empty_counters()
    counters["iteration"] = int(common.get("iteration", iteration))
    counters["flops_so_far"] = float(common.get("num_floating_point_operations_so_far", 0) or 0)
    if args is not None:
        counters["consumed_samples"] = int(getattr(args, "consumed_train_samples", 0) or 0)
        counters["consumed_tokens"] = counters["consumed_samples"] * int(getattr(args, "seq_length", 0) or 0)
    model = _architecture(ckpt_dir, source_config, manifest, common)
    return CheckpointInfo(ckpt_dir, iteration, model, counters, [], {}, {})


def _architecture(ckpt_dir, source_config, manifest, common) -> ModelConfig | None:
    if source_config is not None:
        return resolve_architecture(ckpt_dir, source_config)[0]
    return recorded_architecture(ckpt_dir, manifest=manifest, common=common)[0]
