"""Which checkpoint of a run to grow from: sunk cost, Chinchilla ratio and LR phase per checkpoint.

The paper's recipe (docs/paper.md §6.2, §8): grow from a **constant-LR (pre-decay)**
checkpoint (gains flatten once the base is annealing, because post-growth training re-raises
the LR), that has seen at least **~1x Chinchilla compute** (then interposition clearly beats
stacking), use **interposition**, and budget at least **~1x the sunk FLOPs** for continued
training. More sunk cost gives a better grown model (Table 2), so among the eligible
checkpoints the latest is recommended.

LR phase comes from the ``training`` section of the recipe saved in each checkpoint's manifest
and the iteration, with Megatron-LM's ``OptimizerParamScheduler`` semantics (the LR of the
last step taken before the save) as ``training.optimizer.build_scheduler`` sets it up:
``warmup`` while ``iteration < start + lr_warmup_iters`` (``start``: 0, or the growth
iteration for a run trained from a grown model, from the lineage); WSD:
``stable`` while ``iteration <= lr_decay_iters - lr_wsd_decay_iters`` (``lr_decay_iters``
defaults to ``train_iters``), ``decay`` after; ``constant``: ``constant``; cosine/linear:
``decay`` after warmup; ``unknown`` without a recipe. Checkpoints written by Megatron-LM itself
(no manifest) use the same fields of ``args`` in ``common.pt``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

from megatron.core import dist_checkpointing

from megatron_grow.analysis.sunk_cost import (
    INTERPOSITION_FC_MULTIPLE,
    MIN_BUDGET_SUNK_MULTIPLE,
    SunkCost,
    describe_sunk,
    sunk_cost,
)
from megatron_grow.checkpoint import io, paths
from megatron_grow.checkpoint.manifest import read_checkpoint_info
from megatron_grow.config.schema import DepthMode
from megatron_grow.errors import CheckpointError

CONSTANT_LR_PHASES = ("stable", "constant")


def decay_start(training: dict) -> int | None:
    """The last iteration still at peak LR under WSD (None for other schedules or no recipe)."""
    if not training or training.get("lr_decay_style") != "WSD":
        return None
    total = int(training.get("lr_decay_iters") or training.get("train_iters") or 0)
    return total - int(training.get("lr_wsd_decay_iters") or 0)


def lr_phase(training: dict | None, iteration: int, schedule_start: int = 0) -> str:
    """``warmup`` / ``stable`` / ``decay`` / ``constant`` / ``unknown`` (see the module docstring).

    ``schedule_start``: the iteration the schedule began at, the growth point for a run started
    from a grown model (the trainer then schedules ``train_iters - start`` steps, so warmup
    shifts while the WSD decay still starts at ``train_iters - lr_wsd_decay_iters``).
    """
    if not training or not training.get("lr_decay_style"):
        return "unknown"
    style = training["lr_decay_style"]
    if iteration < schedule_start + int(training.get("lr_warmup_iters") or 0):
        return "warmup"
    if style == "constant":
        return "constant"
    if style == "WSD":
        start = decay_start(training)
        return "stable" if start is None or iteration <= start else "decay"
    return "decay"  # cosine / linear decay from the end of warmup


# Megatron-LM argument names of the schedule (the same names as our TrainingConfig fields).
_SCHEDULE_ARGS = ("lr_decay_style", "train_iters", "lr_decay_iters", "lr_warmup_iters", "lr_wsd_decay_iters")


def training_schedule(info) -> dict:
    """The schedule behind a checkpoint: the ``training`` section of the recipe in its manifest, or
    for a checkpoint written by Megatron-LM itself the same fields of ``args`` in ``common.pt``."""
    training = (info.recipe or {}).get("training")
    if training:
        return dict(training)
    if io.read_manifest(info.ckpt_dir):
        return {}

    try:
        args = (dist_checkpointing.load_common_state_dict(info.ckpt_dir) or {}).get("args")
    except Exception as e:  # advice without a schedule is still useful; say what was not read
        warnings.warn(f"{info.ckpt_dir}/common.pt is unreadable ({type(e).__name__}: {e}); the training "
                      "schedule is unknown", RuntimeWarning, stacklevel=2)
        return {}
    values = vars(args) if args is not None and not isinstance(args, dict) else (args or {})
    return {k: values[k] for k in _SCHEDULE_ARGS if values.get(k) is not None}


def advise_run(run_dir: str, progress: Callable[[str], None] | None = None) -> dict:
    """Rows for every complete ``iter_*`` in ``run_dir`` and the recommended growth point."""
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run directory does not exist: {run_dir}")
    iterations = paths.list_iterations(run_dir)
    if not iterations:
        raise CheckpointError(f"no complete iter_NNNNNNN checkpoints (with metadata.json) in {run_dir}")
    rows = []
    for i, it in enumerate(iterations):
        info = read_checkpoint_info(paths.iteration_dir(run_dir, it), it)
        sunk = sunk_cost(info)
        training = training_schedule(info)
        start = int(info.lineage[-1].get("source_iteration") or 0) if info.lineage else 0
        rows.append({"iteration": it, "checkpoint": info.ckpt_dir, "tokens": sunk.tokens, "sunk_flops": sunk.flops,
                     "estimated": sunk.estimated, "chinchilla_flops": sunk.chinchilla_flops,
                     "fc_ratio": sunk.fc_ratio, "phase": lr_phase(training, it, start),
                     "decay_start": decay_start(training), "lr_decay_style": training.get("lr_decay_style"),
                     "_sunk": sunk})
        if progress is not None:
            progress(f"{i + 1}/{len(iterations)}: iteration {it}")
    choice, reason, warnings = _choose(rows)
    for r in rows:
        r.pop("_sunk")
    rec = None
    if choice is not None:
        rec = {"iteration": choice["iteration"], "checkpoint": choice["checkpoint"],
               "mode": DepthMode.INTERPOSITION.value,
               "phase": choice["phase"], "sunk_flops": choice["sunk_flops"], "fc_ratio": choice["fc_ratio"],
               "chinchilla_flops": choice["chinchilla_flops"],
               "min_continued_flops": MIN_BUDGET_SUNK_MULTIPLE * choice["sunk_flops"],
               "reason": reason}
    return {"run_dir": run_dir, "rows": rows, "recommendation": rec, "warnings": warnings}


def _choose(rows: list) -> tuple[dict | None, str, list]:
    warnings: list[str] = []
    fc = INTERPOSITION_FC_MULTIPLE
    constant = [r for r in rows if r["phase"] in CONSTANT_LR_PHASES]
    eligible = [r for r in constant if r["fc_ratio"] >= fc]
    if eligible:
        best = max(eligible, key=lambda r: r["iteration"])
        later = [r["iteration"] for r in rows if r["iteration"] > best["iteration"]]
        why = (f"the latest constant-LR checkpoint with sunk >= {fc:g}x F_c "
               f"({best['fc_ratio']:.2f}x; more sunk cost gives a better grown model)")
        if later:
            why += f"; later checkpoints {later} are past the start of LR decay"
        return best, why, warnings
    if constant:
        best = max(constant, key=lambda r: r["iteration"])
        warnings.append(f"no constant-LR checkpoint has reached {fc:g}x F_c (best {best['fc_ratio']:.2f}x): "
                        "interposition and stack are about equal this early; training the base further first "
                        "gives a better grown model")
        return best, "the latest constant-LR checkpoint (all are below 1x F_c)", warnings
    unknown = [r for r in rows if r["phase"] == "unknown"]
    if unknown:
        above = [r for r in unknown if r["fc_ratio"] >= fc]
        best = max(above or unknown, key=lambda r: r["iteration"])
        warnings.append("the manifests do not record the LR schedule: make sure this checkpoint was saved before "
                        "LR decay began")
        return best, (f"the latest checkpoint{' with sunk >= 1x F_c' if above else ''} (LR phase unknown)"), warnings
    if rows:
        best = max(rows, key=lambda r: r["sunk_flops"])
        warnings.append("every checkpoint is in warmup or LR decay; growing an annealed checkpoint and re-raising "
                        "the LR wastes the annealing gain: lower the post-growth LR, or save during the stable phase")
        return best, "the checkpoint with the most sunk FLOPs (none is at constant LR)", warnings
    return None, "", warnings


def format_advice(report: dict) -> str:
    head = f"{'iteration':>10} {'tokens':>14} {'sunk FLOPs':>12} {'sunk/F_c':>9} {'LR phase':>9}  note"
    lines = [f"run {report['run_dir']}", head]
    rec = report["recommendation"]
    for r in report["rows"]:
        note = "estimated" if r["estimated"] else ""
        if rec and r["iteration"] == rec["iteration"]:
            note = (note + " " if note else "") + "<- grow from here"
        lines.append(f"{r['iteration']:>10} {r['tokens']:>14,} {r['sunk_flops']:>12.4g} {r['fc_ratio']:>9.3f} "
                     f"{r['phase']:>9}  {note}")
    if report["rows"]:
        r0 = report["rows"][-1]
        lines.append(f"F_c = 6 N_a x 20 N_a = {r0['chinchilla_flops']:.4g} (latest checkpoint's architecture)"
                     + (f"; LR decay ({r0['lr_decay_style']}) starts after iteration {r0['decay_start']}"
                        if r0["decay_start"] is not None else ""))
    if rec:
        lines += [
            f"recommendation: grow iteration {rec['iteration']} ({rec['checkpoint']}) with depth interposition",
            f"  why: {rec['reason']}",
            f"  numbers: sunk {rec['sunk_flops']:.4g} FLOPs = {rec['fc_ratio']:.3f}x F_c "
            f"({rec['chinchilla_flops']:.4g}); LR phase {rec['phase']}",
            f"  continued-training budget: >= {rec['min_continued_flops']:.4g} FLOPs (~1x sunk)",
            f"  next: megatron-grow flops {rec['checkpoint']} --grow-recipe R.yaml --extra-tokens N",
        ]
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


__all__ = ["lr_phase", "decay_start", "advise_run", "format_advice", "CONSTANT_LR_PHASES", "SunkCost",
           "describe_sunk", "sunk_cost"]
