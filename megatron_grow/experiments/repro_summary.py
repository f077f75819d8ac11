"""The study's numbers for one seed: every run's curve, the four findings and the growth options, each
checked to compare runs that spent equal additional FLOPs (from the trainer's counters; the continued
base, which cannot match them exactly, is read on its curve at the grown run's budget)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from megatron_grow.experiments.common import check_same_validation, interpolate, model_summary
from megatron_grow.models.params import count_params
from megatron_grow.training.flops import chinchilla_flops

ALPHAS = (0.0, 0.01)


def _sunk(run: dict) -> float:
    """The FLOPs spent before the run started: the base's at the save a grown or continued run starts
    from (recorded in the checkpoint it loads), 0 for a run from random init."""
    return run["start_counters"]["flops_so_far"] if run["start_counters"] else 0.0


def _curve(run: dict, start_flops: float) -> list:
    """(additional FLOPs, validation loss), starting with the evaluation before the first step."""
    sunk = _sunk(run)
    pts = [(start_flops - sunk, run["start_loss"])] if run["start_loss"] is not None else []
    return pts + [(f - sunk, loss) for _, loss, f in run["valid_losses"]]


def _additional(run: dict) -> float:
    return run["counters"]["flops_so_far"] - _sunk(run)


def check_equal_budgets(names: Sequence[str], results: dict) -> float:
    """The additional FLOPs every named run spent (equal, > 0); RuntimeError naming them otherwise."""
    extra = [_additional(results[n]) for n in names]
    if not all(math.isclose(e, extra[0], rel_tol=1e-9) for e in extra) or extra[0] <= 0:
        raise RuntimeError("additional FLOPs differ: " + ", ".join(f"{n} {e:.4e}" for n, e in zip(names, extra)))
    return extra[0]


def _run_summary(name: str, r: dict, m: dict, size, flops_per_step: float, base_curve: list) -> dict:
    """One run's curve and numbers; checks that a grown run's sunk cost is the base's at its iteration."""
    start_flops = r["start_counters"]["flops_so_far"] if r["start_counters"] else 0.0
    if name != "base" and m["from_iteration"]:
        sunk_expected = flops_per_step * m["from_iteration"]
        if not math.isclose(_sunk(r), sunk_expected, rel_tol=1e-9):
            raise RuntimeError(f"{name}: sunk FLOPs {_sunk(r):.4e} != the base's "
                               f"{sunk_expected:.4e} at iteration {m['from_iteration']}")
    curve = _curve(r, start_flops) if name != "base" else base_curve
    return {
        "model": model_summary(m["model"], size.global_batch_size, size.seq_length), "growth": m["growth"],
        "from_iteration": m["from_iteration"], "sunk_flops": _sunk(r),
        "additional_flops": _additional(r), "curve": curve, "start_loss": r["start_loss"],
        "final_loss": curve[-1][1], "train_losses": r["train_losses"], "counters": r["counters"],
        "valid_tokens_sha256": r["valid_tokens_sha256"], "downstream": r.get("downstream"),
        "seconds": round(r["seconds"], 1), "grow_seconds": round(r["grow"]["seconds"], 2) if "grow" in r else None,
    }


def _acc(run: dict) -> float | None:
    return run["downstream"]["acc"] if run.get("downstream") else None


def _acc_items(run: dict) -> list | None:
    """The downstream task's per-question outcomes (1 right, 0 wrong), by question."""
    return run["downstream"].get("acc_per_question") if run.get("downstream") else None


def _pair(runs: dict, results: dict, grown: str, scratch: str, label: str) -> dict:
    extra = check_equal_budgets([grown, scratch], results)
    g, s = runs[grown]["curve"], runs[scratch]["curve"]
    g_final, s_final = runs[grown]["final_loss"], runs[scratch]["final_loss"]
    reach = next((f for f, loss in s if loss <= g_final), None)
    acc = (_acc(runs[grown]), _acc(runs[scratch]))
    return {"label": label, "grown": grown, "other": scratch, "additional_flops": extra,
            "grown_final": g_final, "other_final": s_final, "grown_minus_other": g_final - s_final,
            "grown_acc": acc[0], "other_acc": acc[1], "acc_grown_minus_other": _minus(*acc),
            "grown_acc_per_question": _acc_items(runs[grown]), "other_acc_per_question": _acc_items(runs[scratch]),
            "scratch_flops_to_reach_grown_final": reach,
            "rows": [{"additional_flops": f, "grown": loss, "scratch": interpolate(s, f)} for f, loss in g]}


def _finding_a(runs: dict, results: dict, last: int) -> list:
    """Grown vs the same architecture from scratch (equal additional FLOPs, exactly), and, when it ran, vs
    the base trained on ("continue"): its final loss and, on its curve, the loss at the grown run's budget."""
    grown = f"interposition_at_{last}"
    a = [_pair(runs, results, grown, "scratch_depth", "depth interposition x2")]
    if "continue_base" in results:
        c = runs["continue_base"]
        budget = runs[grown]["additional_flops"]
        at_budget = interpolate(c["curve"], budget)
        a.append({"label": "continue the base", "grown": grown, "other": "continue_base",
                  "additional_flops": budget, "other_additional_flops": c["additional_flops"],
                  "grown_final": runs[grown]["final_loss"], "other_final": c["final_loss"],
                  "other_at_grown_budget": at_budget,
                  "grown_minus_other": runs[grown]["final_loss"] - at_budget,
                  "grown_acc": _acc(runs[grown]), "other_acc": _acc(c),
                  "acc_grown_minus_other": _minus(_acc(runs[grown]), _acc(c)),
                  "grown_acc_per_question": _acc_items(runs[grown]), "other_acc_per_question": _acc_items(c)})
    return a


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _finding_b(runs: dict, results: dict, saves: list, f_c: float) -> list:
    out = []
    for it in (saves[0], saves[-1]):
        i, s = runs[f"interposition_at_{it}"], runs[f"stack_at_{it}"]
        out.append({
            "base_iteration": it, "sunk_flops": i["sunk_flops"], "sunk_over_fc": i["sunk_flops"] / f_c,
            "additional_flops": check_equal_budgets([f"interposition_at_{it}", f"stack_at_{it}"], results),
            "interposition_start": i["start_loss"], "stack_start": s["start_loss"],
            "interposition_final": i["final_loss"], "stack_final": s["final_loss"],
            "interposition_minus_stack": i["final_loss"] - s["final_loss"],
            "start_interposition_minus_stack": i["start_loss"] - s["start_loss"],
            "interposition_acc": _acc(i), "stack_acc": _acc(s)})
    return out


def _finding_c(runs: dict, results: dict, base_final: float) -> dict:
    names = [f"width_alpha_{alpha:g}" for alpha in ALPHAS]
    rows = [{"alpha": alpha, "run": n, "start_loss": runs[n]["start_loss"], "final_loss": runs[n]["final_loss"],
             "acc": _acc(runs[n]), "acc_per_question": _acc_items(runs[n])} for alpha, n in zip(ALPHAS, names)]
    return {"additional_flops": check_equal_budgets(names, results), "base_final_loss": base_final, "rows": rows}


# The comparisons on one design: each arm against width x2 with alpha 0.01 (top-k x2, moments reset, no
# LR re-warmup) grown from the same save, trained the same number of steps.
REFERENCE_ARM = "width_alpha_0.01"
ARMS = (("width_topk_fixed", "top-k fixed, uniform width x2 (experts x2, top-k kept)"),
        ("upcycle_utility", "top-k fixed, upcycle by utility (experts x2, copies by routing share)"),
        ("width_carry", "Adam moments carried (optimizer: carry)"),
        ("width_policy", "best moment policy (copies' first moment reset, the rest carried)"),
        ("width_rewarmup", "LR re-warmup after growth (training.lr_rewarmup_iters)"))


def _finding_ops(runs: dict, results: dict) -> dict:
    """Each arm's final loss minus the reference's at equal steps (when the arm trained as many), and at the
    arm's own additional FLOPs (the reference's curve interpolated there: top-k fixed spends fewer FLOPs per
    step, and an arm may have trained fewer steps)."""
    ref = runs[REFERENCE_ARM]
    rows = []
    for name, label in ARMS:
        if name not in runs:
            continue
        r = runs[name]
        ref_at = interpolate(ref["curve"], r["additional_flops"])
        same_steps = r["counters"]["iteration"] == ref["counters"]["iteration"]
        rows.append({"run": name, "label": label, "start_loss": r["start_loss"], "final_loss": r["final_loss"],
                     "steps": r["counters"]["iteration"] - r["from_iteration"],
                     "additional_flops": r["additional_flops"], "flops_ratio": r["additional_flops"] /
                     ref["additional_flops"],
                     "minus_reference": r["final_loss"] - ref["final_loss"] if same_steps else None,
                     "minus_reference_at_equal_flops": None if ref_at is None else r["final_loss"] - ref_at})
    return {"reference": REFERENCE_ARM, "reference_final": ref["final_loss"], "reference_start": ref["start_loss"],
            "rows": rows}


def _finding_d(runs: dict, results: dict, saves: list, base_at: dict, f_c: float) -> dict:
    names = ["scratch_depth"] + [f"interposition_at_{it}" for it in saves]
    rows = []
    for name, it in zip(names, [0] + saves):
        sunk = runs[name]["sunk_flops"]
        rows.append({"run": name, "base_iteration": it, "sunk_flops": sunk, "sunk_over_fc": sunk / f_c,
                     "base_loss": base_at[it][0] if it else None, "start_loss": runs[name]["start_loss"],
                     "final_loss": runs[name]["final_loss"], "acc": _acc(runs[name])})
    finals = [row["final_loss"] for row in rows]
    return {"additional_flops": check_equal_budgets(names, results), "rows": rows,
            "final_loss_monotone_in_sunk": all(x > y for x, y in zip(finals, finals[1:])),
            "spearman_sunk_vs_final": spearman([row["sunk_flops"] for row in rows], finals)}


def summarize_seed(size, meta: dict, results: dict, saves: list, seed: int,
                   findings: tuple = ("a", "b", "c", "d")) -> dict:
    """One seed's runs and the chosen findings (``size``: the experiment size with the resolved ``base_iters``)."""
    base = results["base"]
    n_a = count_params(meta["base"]["model"]).activated
    f_c = chinchilla_flops(n_a)
    base_curve = [(0.0, base["start_loss"])] + [(f, loss) for _, loss, f in base["valid_losses"]]
    base_at = {it: (loss, f) for it, loss, f in base["valid_losses"]}
    flops_per_step = base["counters"]["flops_so_far"] / base["counters"]["iteration"]
    runs = {name: _run_summary(name, r, meta[name], size, flops_per_step, base_curve) for name, r in results.items()
            if name in meta}  # route_stats_* steps are no runs
    return {
        "seed": seed, "validation_tokens_sha256": check_same_validation({n: results[n] for n in runs}),
        "save_iterations": saves, "flops_per_base_step": flops_per_step,
        "base": {"activated_params": n_a, "chinchilla_flops": f_c, "final_loss": base_curve[-1][1],
                 "acc": _acc(runs["base"]), "norm_profiles": base.get("norm_profiles"),
                 "saves": [{"iteration": it, "sunk_flops": base_at[it][1], "sunk_over_fc": base_at[it][1] / f_c,
                            "valid_loss": base_at[it][0]} for it in saves]},
        "runs": runs,
        "findings": {key: compute() for letter, key, compute in (
            ("a", "a_grown_vs_scratch", lambda: _finding_a(runs, results, saves[-1])),
            ("b", "b_interposition_vs_stack", lambda: _finding_b(runs, results, saves, f_c)),
            ("c", "c_width_alpha", lambda: _finding_c(runs, results, base_curve[-1][1])),
            ("d", "d_sunk_cost", lambda: _finding_d(runs, results, saves, base_at, f_c)),
            ("ops", "ops_comparisons", lambda: _finding_ops(runs, results))) if letter in findings},
    }


def check_same_validation_everywhere(per_seed: list) -> str:
    """The one validation-token digest of every run of every seed; RuntimeError naming seeds that differ."""
    digests = {s["seed"]: s["validation_tokens_sha256"] for s in per_seed}
    if len(set(digests.values())) != 1:
        raise RuntimeError("seeds were evaluated on different validation tokens: "
                           + ", ".join(f"seed {k} {d[:12]}" for k, d in digests.items()))
    return next(iter(digests.values()))


def spearman(xs: list, ys: list) -> float:
    """Spearman's rank correlation (ties broken by position; the inputs here have none)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")
