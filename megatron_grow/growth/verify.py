"""Check a grown checkpoint against its source on a probe batch (collective).

Reports, on the same token batch fed to both models in the same parallel layout:
logits KL(source || grown) per token, top-1 agreement, max |logit difference|, and the
routing load per layer of the original experts vs their copies (from the routers' own
routing maps), so a width growth that breaks routing symmetry or a depth growth that
drifts far from the source is visible at once.

The probe batch is seeded random tokens unless token batches are passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_grow.checkpoint import io, keys, paths
from megatron_grow.checkpoint.architecture import (
    model_config_from_dict,
    recorded_architecture,
    resolve_architecture,
)
from megatron_grow.checkpoint.manifest import read_checkpoint_info
from megatron_grow.config.layout_rules import model_layout_problems
from megatron_grow.config.schema import (
    GrowthConfig,
    ModelConfig,
    OptimizerCarry,
    OptimizerPolicyConfig,
    ParallelConfig,
    moe_layer_pattern,
)
from megatron_grow.errors import CheckpointError, LayoutError, VerificationError
from megatron_grow.growth.operators import operator_class
from megatron_grow.growth.plan import GrowthPlan, make_growth_plan
from megatron_grow.models.builder import build_model_chunks
from megatron_grow.models.forward import forward_logits
from megatron_grow.models.routing import RoutingCounter
from megatron_grow.models.specs import built_with_te
from megatron_grow.parallel.collectives import all_reduce_host
from megatron_grow.parallel.init import initialize_distributed


def _growth_from_record(record: dict) -> GrowthConfig:
    """The growth a lineage record (``grow.growth_record``) describes, its sections rebuilt by their operators."""
    sections = {name: operator_class(name).config_type(**record[name])
                for name in GrowthConfig.operator_names() if record.get(name)}
    return GrowthConfig(order=tuple(record["operators"]), seed=record["seed"],
                        optimizer=record.get("optimizer", OptimizerCarry.RESET.value),
                        optimizer_policy=OptimizerPolicyConfig.from_record(record.get("optimizer_policy")), **sections)


def _probe_batches(vocab: int, seq: int, n_micro: int, micro: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (micro, seq), generator=g) for _ in range(n_micro)]


def verify_growth(source_root: str, grown_root: str, parallel: ParallelConfig, *,
                  batches: Sequence[torch.Tensor] | None = None, seq_length: int | None = None,
                  seed: int = 0, source_model: str | ModelConfig | None = None,
                  params_dtype: torch.dtype = torch.float32) -> dict:
    """Compare the grown model's logits and routing with the source's on a probe batch (collective).

    Args:
        source_root, grown_root: SRC and the grown checkpoint.
        parallel: the layout both are loaded in.
        batches, seq_length, seed: the probe tokens; None: drawn from ``seed``.
        source_model: a ModelConfig or a --source-config recipe path describing SRC; None: SRC's
            architecture as every command resolves it, and only when SRC records none, taken from
            the grown checkpoint's own growth record.
        params_dtype: the dtype both models are built in (bf16 on a GPU check).

    Returns:
        The metrics (the same dict on every rank).
    """
    grown_dir, grown_it = paths.resolve_checkpoint_dir(grown_root)
    grown = read_checkpoint_info(grown_dir, grown_it)
    if grown.model is None or not grown.lineage:
        raise CheckpointError(f"{grown_dir} records no growth lineage; it was not written by megatron-grow grow")
    src_dir, _ = paths.resolve_checkpoint_dir(source_root)
    record = grown.lineage[-1]
    source_cfg = _source_architecture(src_dir, source_model, record, grown_dir)
    plan = make_growth_plan(source_cfg, _growth_from_record(record))
    problems = model_layout_problems(source_cfg, parallel) + model_layout_problems(plan.target, parallel)
    if problems:
        raise LayoutError("verify builds source and grown model in one layout: " + "; ".join(problems))
    initialize_distributed(parallel)
    if batches is None:
        batches = _probe_batches(source_cfg.vocab_size, seq_length or min(source_cfg.seq_length, 64), 2, 2, seed)
    src_logits, src_loads, src_maps = _run_checkpoint(source_cfg, src_dir, parallel, batches, params_dtype)
    grown_logits, loads, grown_maps = _run_checkpoint(plan.target, grown_dir, parallel, batches, params_dtype)
    metrics = _logit_metrics(src_logits, grown_logits, source_cfg.vocab_size) if src_logits is not None else {}
    metrics.update(_routing_metrics(loads, plan))
    metrics.update(_routing_change(src_loads, loads, src_maps, grown_maps, plan))
    # Broadcast the last stage's numbers so every rank returns the same dict.
    if torch.distributed.is_initialized():
        holders = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(holders, metrics)
        metrics = max(holders, key=lambda m: len(m))
    return metrics


def _source_architecture(src_dir: str, explicit, record: dict, grown_dir: str) -> ModelConfig:
    if explicit is not None:
        return resolve_architecture(src_dir, explicit)[0]
    model, _ = recorded_architecture(src_dir)
    return model if model is not None else model_config_from_dict(record["source_model"], grown_dir)


def _run_checkpoint(model_cfg: ModelConfig, ckpt_dir: str, parallel: ParallelConfig, batches,
                    params_dtype: torch.dtype = torch.float32) -> tuple:
    """Load ``ckpt_dir`` (stored under either layer spec's names) and run the probe batches:
    (last-stage logits or None, per-layer routing counts, this rank's per-token routing maps by layer)."""
    chunks = build_model_chunks(model_cfg, parallel, initialize=False, params_dtype=params_dtype)
    state = io.model_sharded_state_dict(chunks)
    stored = io.read_storage_metadata(ckpt_dir).state_dict_metadata.keys()
    keys.rename_for_spec(state, keys.built_spec(built_with_te(chunks)), keys.storage_spec(stored) or keys.LOCAL_SPEC)
    io.load_checkpoint(ckpt_dir, state)
    counter = RoutingCounter(chunks, keep_maps=True)
    logits, _ = forward_logits(chunks, batches)
    return logits, counter.gathered(model_cfg.num_layers, model_cfg.num_moe_experts), counter.maps


def _logit_metrics(src_logits: torch.Tensor, grown_logits: torch.Tensor, vocab: int) -> dict:
    # Padding columns are not part of the distribution.
    p_log = torch.log_softmax(src_logits[..., :vocab].double(), dim=-1)
    q_log = torch.log_softmax(grown_logits[..., :vocab].double(), dim=-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    return dict(
        kl_mean=float(kl.mean()), kl_max=float(kl.max()),
        top1_agreement=float((p_log.argmax(-1) == q_log.argmax(-1)).double().mean()),
        max_abs_logit_diff=float((src_logits[..., :vocab] - grown_logits[..., :vocab]).abs().max()),
        tokens=int(kl.numel()),
    )


def _moe_layers(plan: GrowthPlan) -> list[int]:
    """The grown model's MoE layers: the routing metrics average over these (a dense layer routes nothing)."""
    return [j for j, moe in enumerate(moe_layer_pattern(plan.target)) if moe]


def _routing_metrics(loads: torch.Tensor, plan: GrowthPlan) -> dict:
    moe = _moe_layers(plan)
    share = (loads / loads.sum(dim=1, keepdim=True).clamp_min(1))[moe]
    original = torch.tensor([[c == 0 for c in row] for row in plan.expert_copy_index])[moe]  # [L_moe, E_tgt]
    pair_gap = 0.0
    for i, j in enumerate(moe):
        for e, c in enumerate(plan.expert_copy_index[j]):
            if c > 0:
                pair_gap = max(pair_gap, float((share[i, e] - share[i, _original_of(plan, j, e)]).abs()))
    return {
        "routing_share_original": float((share * original).sum(1).mean()),
        "routing_share_copies": float((share * ~original).sum(1).mean()),
        "max_copy_vs_original_share_gap": pair_gap,
        "per_layer_share_original": [round(float(x), 4) for x in (share * original).sum(1)],
        "has_copies": bool((~original).any()),
    }


def _to_source(plan: GrowthPlan, target_layer: int) -> torch.Tensor:
    """``[E_tgt, E_src]``: 1 where a target expert of ``target_layer`` copies a source expert."""
    sources = plan.expert_source[target_layer]
    out = torch.zeros(len(sources), plan.source.num_moe_experts, dtype=torch.float64)
    out[torch.arange(len(sources)), torch.tensor(sources)] = 1
    return out


def _routing_change(src_loads: torch.Tensor, loads: torch.Tensor, src_maps: dict, grown_maps: dict,
                    plan: GrowthPlan) -> dict:
    """The routing before and after, per source expert (a grown expert counts for the source expert it
    copies): the mean share of each, the mass moved between them (total variation, mean over layers),
    and the share of (token, layer) pairs whose selected set of source experts changed (collective;
    over the layers a rank holds in both models, all of them without PP)."""
    moe = _moe_layers(plan)
    before = src_loads[[plan.layer_source[j] for j in moe]]
    after = torch.stack([loads[j].to(torch.float64) @ _to_source(plan, j) for j in moe])
    before = before / before.sum(1, keepdim=True).clamp_min(1)
    after = after / after.sum(1, keepdim=True).clamp_min(1)
    changed_and_seen = torch.zeros(2, dtype=torch.float64)
    for j, maps in grown_maps.items():
        if plan.layer_source[j] not in src_maps:
            continue
        for grown_map, src_map in zip(maps, src_maps[plan.layer_source[j]]):
            projected = (grown_map.to(torch.float64) @ _to_source(plan, j)) > 0
            changed_and_seen += torch.tensor([float((projected != src_map).any(1).sum()), float(len(src_map))])
    if torch.distributed.is_initialized():
        all_reduce_host(changed_and_seen)
    return {
        "routing_share_by_source_expert_before": [round(float(x), 4) for x in before.mean(0)],
        "routing_share_by_source_expert_after": [round(float(x), 4) for x in after.mean(0)],
        "routing_mass_moved": float(0.5 * (after - before).abs().sum(1).mean()),
        "topk_set_changed": float(changed_and_seen[0] / changed_and_seen[1]) if changed_and_seen[1] else None,
    }


def threshold_failures(metrics: dict, max_kl: float | None = None, min_routing_share: float | None = None) -> list:
    """The thresholds ``metrics`` fails, one line each.

    Args:
        metrics: ``verify_growth``'s result.
        max_kl: bound on the mean KL(source || grown); None: not checked.
        min_routing_share: the least share of routed tokens the copied experts must receive (mean
            over layers), for a width growth; None: not checked.

    Returns:
        The failures; empty when passed or no threshold is set.
    """
    failures = []
    if max_kl is not None and "kl_mean" in metrics and not metrics["kl_mean"] <= max_kl:
        failures.append(f"KL(source || grown) mean {metrics['kl_mean']:.3e} exceeds --max-kl {max_kl:g}")
    if min_routing_share is not None:
        if not metrics.get("has_copies"):
            failures.append("--min-routing-share was given but the growth made no expert copies")
        elif not metrics["routing_share_copies"] >= min_routing_share:
            failures.append(f"copied experts got {metrics['routing_share_copies']:.4f} of the routing, less than "
                            f"--min-routing-share {min_routing_share:g}")
    return failures


def check_thresholds(metrics: dict, max_kl: float | None = None, min_routing_share: float | None = None) -> None:
    """Raise when ``metrics`` fails a threshold (``threshold_failures``' arguments).

    Raises:
        VerificationError: naming every failed threshold (the CLI's exit 4).
    """
    failures = threshold_failures(metrics, max_kl, min_routing_share)
    if failures:
        raise VerificationError("verify failed: " + "; ".join(failures))


def _original_of(plan, target_layer: int, target_expert: int) -> int:
    """The target index of the original (copy_index 0) expert that ``target_expert`` of ``target_layer`` copies."""
    src = plan.expert_source[target_layer][target_expert]
    for e, (s, c) in enumerate(zip(plan.expert_source[target_layer], plan.expert_copy_index[target_layer])):
        if s == src and c == 0:
            return e
    raise ValueError(f"no original for expert {target_expert}")


def format_metrics(m: dict) -> str:
    """``verify_growth``'s metrics as the lines ``megatron-grow verify`` prints.

    Args:
        m: ``verify_growth``'s result.

    Returns:
        The text.
    """
    lines = ["verify: grown vs source on the probe batch"]
    if "kl_mean" in m:
        lines += [
            f"  tokens                      {m['tokens']}",
            f"  KL(source || grown) mean    {m['kl_mean']:.3e}   (max {m['kl_max']:.3e})",
            f"  top-1 agreement             {m['top1_agreement'] * 100:.2f}%",
            f"  max |logit difference|      {m['max_abs_logit_diff']:.3e}",
        ]
    lines += [
        f"  routing share, originals    {m['routing_share_original'] * 100:.2f}%",
        f"  routing share, copies       {m['routing_share_copies'] * 100:.2f}%",
        f"  max copy/original share gap {m['max_copy_vs_original_share_gap'] * 100:.2f} points",
    ]
    if "routing_mass_moved" in m:
        changed = m["topk_set_changed"]
        lines += [
            "  routing by source expert    before " + " ".join(f"{x:.3f}" for x in
                                                             m["routing_share_by_source_expert_before"]),
            "                              after  " + " ".join(f"{x:.3f}" for x in
                                                             m["routing_share_by_source_expert_after"]),
            f"  routing mass moved          {m['routing_mass_moved'] * 100:.2f}%",
            f"  top-k set changed           {'n/a' if changed is None else f'{changed * 100:.2f}%'} of tokens",
        ]
    return "\n".join(lines)
