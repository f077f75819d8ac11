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

from megatron_grow.checkpoint import io, layout
from megatron_grow.checkpoint.manifest import read_checkpoint_info
from megatron_grow.config.schema import DepthGrowthConfig, GrowthConfig, ParallelConfig, WidthGrowthConfig
from megatron_grow.errors import CheckpointError
from megatron_grow.growth.plan import make_growth_plan
from megatron_grow.models.routing import RoutingCounter


def _growth_from_record(record: dict) -> GrowthConfig:
    depth = DepthGrowthConfig(**record["depth"]) if record.get("depth") else None
    width = WidthGrowthConfig(**record["width"]) if record.get("width") else None
    return GrowthConfig(order=tuple(record["operators"]), depth=depth, width=width, seed=record["seed"],
                        optimizer=record.get("optimizer", "reset"))


def _probe_batches(vocab: int, seq: int, n_micro: int, micro: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (micro, seq), generator=g) for _ in range(n_micro)]


def verify_growth(source_root: str, grown_root: str, parallel: ParallelConfig, *,
                  batches: Sequence[torch.Tensor] | None = None, seq_length: int | None = None,
                  seed: int = 0) -> dict:
    """Compare logits and routing; returns the metrics (the same dict on every rank)."""
    from megatron_grow.models.builder import build_model_chunks
    from megatron_grow.models.forward import forward_logits
    from megatron_grow.parallel.init import initialize_distributed

    grown_dir, grown_it = layout.resolve_checkpoint_dir(grown_root)
    grown = read_checkpoint_info(grown_dir, grown_it)
    if grown.model is None or not grown.lineage:
        raise CheckpointError(f"{grown_dir} records no growth lineage; it was not written by megatron-grow grow")
    src_dir, src_it = layout.resolve_checkpoint_dir(source_root)
    source = read_checkpoint_info(src_dir, src_it)
    record = grown.lineage[-1]
    if source.model is None:
        from megatron_grow.checkpoint.manifest import model_config_from_dict

        source.model = model_config_from_dict(record["source_model"], grown_dir)
    plan = make_growth_plan(source.model, _growth_from_record(record))
    initialize_distributed(parallel)
    seq = seq_length or min(source.model.seq_length, 64)
    if batches is None:
        batches = _probe_batches(source.model.vocab_size, seq, 2, 2, seed)

    results = {}
    for name, model_cfg, ckpt in (("source", source.model, src_dir), ("grown", plan.target, grown_dir)):
        chunks = build_model_chunks(model_cfg, parallel, initialize=False)
        io.load_checkpoint(ckpt, io.model_sharded_state_dict(chunks))
        counter = RoutingCounter(chunks)
        logits, _ = forward_logits(chunks, batches)
        results[name] = (logits, counter.gathered(model_cfg.num_layers, model_cfg.num_moe_experts))
        del chunks

    metrics = {}
    src_logits, grown_logits = results["source"][0], results["grown"][0]
    if src_logits is not None:
        vocab = source.model.vocab_size  # padding columns are not part of the distribution
        p_log = torch.log_softmax(src_logits[..., :vocab].double(), dim=-1)
        q_log = torch.log_softmax(grown_logits[..., :vocab].double(), dim=-1)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1)
        metrics.update(
            kl_mean=float(kl.mean()), kl_max=float(kl.max()),
            top1_agreement=float((p_log.argmax(-1) == q_log.argmax(-1)).double().mean()),
            max_abs_logit_diff=float((src_logits[..., :vocab] - grown_logits[..., :vocab]).abs().max()),
            tokens=int(kl.numel()),
        )
    loads = results["grown"][1]
    share = loads / loads.sum(dim=1, keepdim=True).clamp_min(1)
    original = torch.tensor([c == 0 for c in plan.expert_copy_index])
    metrics["routing_share_original"] = float(share[:, original].sum(1).mean())
    metrics["routing_share_copies"] = float(share[:, ~original].sum(1).mean())
    pair_gap = 0.0
    for e, c in enumerate(plan.expert_copy_index):
        if c > 0:
            src = _original_of(plan, e)
            pair_gap = max(pair_gap, float((share[:, e] - share[:, src]).abs().max()))
    metrics["max_copy_vs_original_share_gap"] = pair_gap
    metrics["per_layer_share_original"] = [round(float(x), 4) for x in share[:, original].sum(1)]
    # Broadcast the last stage's numbers so every rank returns the same dict.
    if torch.distributed.is_initialized():
        holders = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(holders, metrics)
        metrics = max(holders, key=lambda m: len(m))
    return metrics


def _original_of(plan, target_expert: int) -> int:
    """The target index of the original (copy_index 0) expert that ``target_expert`` copies."""
    src = plan.expert_source[target_expert]
    for e, (s, c) in enumerate(zip(plan.expert_source, plan.expert_copy_index)):
        if s == src and c == 0:
            return e
    raise ValueError(f"no original for expert {target_expert}")


def format_metrics(m: dict) -> str:
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
    return "\n".join(lines)
