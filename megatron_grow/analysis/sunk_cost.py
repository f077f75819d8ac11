"""Sunk cost of a checkpoint against Chinchilla compute, the paper's growth advice, and growth budgets.

Conventions (docs/paper.md §1.3, §6, §7):

* **sunk FLOPs**: all training FLOPs behind a checkpoint's weights, ``counters.flops_so_far``
  (Megatron-LM's ``num_floating_point_operations_so_far``). When a checkpoint does not record
  it, it is *estimated* as ``consumed_tokens x training_flops_per_token(model)`` (our FLOPs
  formula, ``training.flops``; it assumes the current architecture for every token).
* **Chinchilla compute** ``F_c = 6 N_a x 20 N_a`` with ``N_a`` the activated parameters in the
  paper's count (``models.params.ParamCounts.activated``: both embeddings included).
* **advice**: interposition clearly beats stacking once the base has seen more than ~1x F_c
  (below that the two are similar; interposition stays the default); budget the continued
  training at least ~1x the sunk FLOPs; grow from a constant-LR (pre-decay) checkpoint.
* **grown vs scratch** for ``E`` extra tokens on the grown model (FLOPs/token ``f``): the grown
  run spends ``E f`` more, ``sunk + E f`` in all. The paper's comparison gives a from-scratch
  model of the grown size the same *extra* budget ``E f`` (sunk cost left out, generous to
  growth); the fixed-total comparison gives it ``sunk + E f``, i.e. ``sunk / f`` more tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from megatron_grow.checkpoint import paths
from megatron_grow.checkpoint.manifest import CheckpointInfo, read_checkpoint_info
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import DepthMode, ModelConfig
from megatron_grow.errors import CheckpointError, GrowthError
from megatron_grow.growth.plan import make_growth_plan
from megatron_grow.models.params import count_params
from megatron_grow.training.flops import chinchilla_flops, training_flops_per_token

# The paper's thresholds (docs/paper.md §1.3 and §8).
INTERPOSITION_FC_MULTIPLE = 1.0
MIN_BUDGET_SUNK_MULTIPLE = 1.0


@dataclass(frozen=True)
class SunkCost:
    """Sunk FLOPs of one checkpoint and where they sit relative to Chinchilla compute."""

    iteration: int
    tokens: int
    flops: float
    estimated: bool            # True: consumed_tokens x FLOPs/token, not a recorded counter
    flops_per_token: float     # training FLOPs/token of the checkpoint's architecture
    activated_params: int
    chinchilla_flops: float    # F_c = 6 N_a x 20 N_a
    growths: int               # growth records in the lineage

    @property
    def fc_ratio(self) -> float:
        return self.flops / self.chinchilla_flops if self.chinchilla_flops else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "fc_ratio": self.fc_ratio}


def sunk_cost(info: CheckpointInfo) -> SunkCost:
    if info.model is None:
        raise CheckpointError(f"{info.ckpt_dir} does not record its architecture (no megatron_grow.json and no "
                              "Megatron-LM args in common.pt); FLOPs cannot be computed")
    fpt = training_flops_per_token(info.model).total
    c = info.counters
    recorded = float(c.get("flops_so_far") or 0)
    tokens = int(c.get("consumed_tokens") or 0)
    n_a = count_params(info.model).activated
    return SunkCost(iteration=int(c.get("iteration") or info.iteration), tokens=tokens,
                    flops=recorded if recorded > 0 else tokens * fpt, estimated=not recorded > 0,
                    flops_per_token=fpt, activated_params=n_a, chinchilla_flops=chinchilla_flops(n_a),
                    growths=len(info.lineage))


def recommended_mode(sunk: SunkCost) -> tuple[str, str]:
    """(operator, why) per the paper's rule."""
    r = sunk.fc_ratio
    interposition = DepthMode.INTERPOSITION.value
    if r >= INTERPOSITION_FC_MULTIPLE:
        return interposition, (f"sunk = {r:.2f}x F_c >= {INTERPOSITION_FC_MULTIPLE:g}x: past this point "
                                 "interposition clearly beats stacking (the layer-norm profile has settled and "
                                 "stacking puts a cliff at the seam)")
    return interposition, (f"sunk = {r:.2f}x F_c < {INTERPOSITION_FC_MULTIPLE:g}x: interposition and stack are "
                             "about equal this early (interposition stays the default); more base training "
                             "before growing raises the final accuracy")


def describe_sunk(sunk: SunkCost) -> str:
    if sunk.estimated:
        if sunk.tokens == 0:
            return "0 (no FLOPs counter and no consumed tokens recorded: estimated 0)"
        return (f"{sunk.flops:.4g} (estimated: {sunk.tokens:,} consumed tokens x {sunk.flops_per_token:.4g} "
                f"FLOPs/token; the checkpoint has no FLOPs counter)")
    return f"{sunk.flops:.4g} (recorded counter flops_so_far)"


def growth_target(model: ModelConfig, recipe_path: str, overrides: Iterable[str] = ()) -> tuple:
    """(recipe, plan) for applying ``recipe_path``'s growth section to ``model``."""

    recipe = load_recipe(recipe_path, list(overrides))
    if recipe.growth is None:
        raise GrowthError(f"{recipe_path} has no growth: section (see configs/growth/)")
    return recipe, make_growth_plan(model, recipe.growth)


def flops_report(path: str, grow_recipe: str | None = None, extra_tokens: int | None = None,
                 overrides: Iterable[str] = ()) -> dict:
    """Everything ``megatron-grow flops`` prints, as plain data."""
    ckpt_dir, it = paths.resolve_checkpoint_dir(path)
    info = read_checkpoint_info(ckpt_dir, it)
    sunk = sunk_cost(info)
    mode, why = recommended_mode(sunk)
    out: dict = {
        "checkpoint": ckpt_dir,
        "sunk": sunk.as_dict(),
        "sunk_text": describe_sunk(sunk),
        "recorded_sunk_before_latest_growth": float(info.counters.get("sunk_flops") or 0),
        "advice": {
            "mode": mode, "why": why,
            "min_continued_flops": MIN_BUDGET_SUNK_MULTIPLE * sunk.flops,
            "lr": "grow from a constant-LR (pre-decay) checkpoint; after an annealed one, re-raising the LR "
                  "wastes the annealing gain",
        },
        "growth": None,
    }
    if extra_tokens is not None and extra_tokens < 0:
        raise CheckpointError(f"--extra-tokens must be >= 0, got {extra_tokens}")
    if grow_recipe is None:
        if extra_tokens is not None:
            extra = extra_tokens * sunk.flops_per_token
            out["continued"] = {"extra_tokens": extra_tokens, "extra_flops": extra,
                                "extra_over_sunk": extra / sunk.flops if sunk.flops else None}
        return out
    recipe, plan = growth_target(info.model, grow_recipe, overrides)
    target = plan.target
    tp = count_params(target)
    fpt = training_flops_per_token(target).total
    g: dict = {
        "recipe": grow_recipe,
        "operators": list(plan.order),
        "depth_mode": recipe.growth.depth.mode if recipe.growth.depth else None,
        "source": {"layers": plan.source.num_layers, "experts": plan.source.num_moe_experts,
                   "topk": plan.source.moe_router_topk},
        "target": {"layers": target.num_layers, "experts": target.num_moe_experts, "topk": target.moe_router_topk},
        "total_params": tp.total,
        "activated_params": tp.activated,
        "flops_per_token": fpt,
        "flops_per_token_ratio": fpt / sunk.flops_per_token,
        "chinchilla_flops": chinchilla_flops(tp.activated),
        "min_continued_tokens": MIN_BUDGET_SUNK_MULTIPLE * sunk.flops / fpt,
    }
    if extra_tokens is not None:
        extra = extra_tokens * fpt
        total = sunk.flops + extra
        g["budget"] = {
            "extra_tokens": extra_tokens,
            "extra_flops": extra,
            "grown_total_flops": total,
            "extra_over_sunk": extra / sunk.flops if sunk.flops else None,
            "meets_rule_of_thumb": extra >= MIN_BUDGET_SUNK_MULTIPLE * sunk.flops,
            "scratch_same_extra": {"flops": extra, "tokens": extra_tokens},
            "scratch_same_total": {"flops": total, "tokens": total / fpt},
        }
    out["growth"] = g
    return out


def format_flops_report(r: dict) -> str:
    s = r["sunk"]
    a = r["advice"]
    lines = [
        f"checkpoint                   {r['checkpoint']} (iteration {s['iteration']})",
        f"consumed tokens              {s['tokens']:,}",
        f"training FLOPs/token         {s['flops_per_token']:.6g} (fwd+bwd, full attention, router included)",
        f"sunk FLOPs                   {r['sunk_text']}",
    ]
    if s["growths"]:
        lines.append(f"  (grown {s['growths']} time(s); FLOPs before the latest growth: "
                     f"{r['recorded_sunk_before_latest_growth']:.4g})")
    lines += [
        f"activated params N_a         {s['activated_params']:,} (paper's count: both embeddings)",
        f"Chinchilla F_c = 6 N_a 20 N_a {s['chinchilla_flops']:.6g}",
        f"sunk / F_c                   {s['fc_ratio']:.4f}",
        f"advice: operator             {a['mode']} ({a['why']})",
        f"advice: continued budget     >= {a['min_continued_flops']:.4g} FLOPs (~1x sunk)",
        f"advice: LR                   {a['lr']}",
    ]
    c = r.get("continued")
    if c:
        lines.append(f"continued on this model      {c['extra_tokens']:,} tokens = {c['extra_flops']:.4g} FLOPs"
                     + (f" ({c['extra_over_sunk']:.2f}x sunk)" if c["extra_over_sunk"] is not None else ""))
    g = r.get("growth")
    if g:
        src, tgt = g["source"], g["target"]
        lines += [
            f"planned growth               {' then '.join(g['operators'])}"
            + (f" ({g['depth_mode']})" if g["depth_mode"] else "") + f" from {g['recipe']}",
            f"  layers / experts / top-k   {src['layers']}/{src['experts']}/{src['topk']} -> "
            f"{tgt['layers']}/{tgt['experts']}/{tgt['topk']}",
            f"  grown params               total {g['total_params']:,}, activated {g['activated_params']:,}",
            f"  grown FLOPs/token          {g['flops_per_token']:.6g} ({g['flops_per_token_ratio']:.3f}x the source)",
            f"  grown F_c                  {g['chinchilla_flops']:.6g}",
            f"  continued >= 1x sunk       {g['min_continued_tokens']:.4g} tokens of the grown model",
        ]
        b = g.get("budget")
        if b:
            ok = "meets" if b["meets_rule_of_thumb"] else "is BELOW"
            ratio = f"{b['extra_over_sunk']:.2f}x sunk, " if b["extra_over_sunk"] is not None else ""
            lines += [
                f"  extra training             {b['extra_tokens']:,} tokens = {b['extra_flops']:.6g} FLOPs "
                f"({ratio}{ok} the >= 1x sunk rule of thumb)",
                f"  grown path total           sunk + extra = {b['grown_total_flops']:.6g} FLOPs",
                f"  scratch, same extra FLOPs  {b['scratch_same_extra']['flops']:.6g} FLOPs = "
                f"{b['scratch_same_extra']['tokens']:,} tokens (the paper's comparison; leaves sunk out)",
                f"  scratch, same total FLOPs  {b['scratch_same_total']['flops']:.6g} FLOPs = "
                f"{b['scratch_same_total']['tokens']:,.0f} tokens",
            ]
    return "\n".join(lines)
