"""The reproduction over seeds: every finding as a mean paired difference with its standard error.

A difference is computed inside each seed (both runs saw the same base, data order and validation
tokens), then averaged over seeds: mean, standard error s / sqrt(n) with the sample standard
deviation s (n - 1 in the denominator), and the two-sided 95 % interval mean +- t(0.975, n - 1) SE
(Student's t, from scipy). A finding is *reproduced* when that interval lies on the paper's side
of zero, *contradicted* when it lies on the other side, and otherwise *within noise* (the sign of
the mean is reported); where the paper expects a tie or a positive difference, an interval that
contains zero is *consistent*. With 3 seeds, t = 4.30: only large, consistent differences count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from scipy import stats

# What the paper expects of each difference (docs/paper.md): "negative" / "positive" = that side of
# zero; "not_negative" = zero or positive (stack ties or wins before ~1 F_c, docs/paper.md §1.3).
EXPECTATIONS = ("negative", "positive", "not_negative")


def mean_se(values: Sequence[float]) -> dict:
    """Mean, standard error and the 95 % t interval of ``values`` (None where n < 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "se": None, "ci95": None, "values": list(values)}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1)) * se
    return {"n": n, "mean": mean, "se": se, "ci95": [mean - half, mean + half], "values": list(values)}


def verdict(stat: dict, expected: str) -> str:
    """``reproduced``, ``contradicted`` or ``within noise (...)`` for a difference and the paper's side."""
    if expected not in EXPECTATIONS:
        raise ValueError(f"unknown expectation {expected!r}")
    if stat["ci95"] is None:
        return "one seed: no error bar"
    lo, hi = stat["ci95"]
    if expected == "negative":
        return "reproduced" if hi < 0 else "contradicted" if lo > 0 else _noise(stat["mean"] < 0)
    if expected == "positive":
        return "reproduced" if lo > 0 else "contradicted" if hi < 0 else _noise(stat["mean"] > 0)
    # not_negative: a tie is what the paper describes; only a clear negative contradicts it.
    return "contradicted" if hi < 0 else "reproduced" if lo > 0 else "consistent (no clear difference)"


def _noise(paper_side: bool) -> str:
    return "within noise (mean on the paper's side)" if paper_side else "within noise (mean on the other side)"


def _row(finding: str, quantity: str, expected: str, paper: str, values: list) -> dict | None:
    if not values or any(v is None for v in values):
        return None
    stat = mean_se(values)
    return dict(stat, finding=finding, quantity=quantity, expected=expected, paper=paper,
                verdict=verdict(stat, expected))


def _over_seeds(per_seed: list, pick: Callable[[dict], float | None]) -> list:
    return [pick(s["findings"]) for s in per_seed]


def _rows_a(per_seed: list) -> list:
    rows = []
    for k, pair in enumerate(per_seed[0]["findings"]["a_grown_vs_scratch"]):
        label = pair["label"]
        rows.append(_row("a", f"final loss, grown - scratch ({label})", "negative",
                         "grown beats scratch at equal additional FLOPs",
                         _over_seeds(per_seed, lambda f, k=k: f["a_grown_vs_scratch"][k]["grown_minus_scratch"])))
        rows.append(_row("a", f"cloze accuracy, grown - scratch ({label})", "positive", "+6.2 points at 70B",
                         _over_seeds(per_seed, lambda f, k=k: f["a_grown_vs_scratch"][k]["acc_grown_minus_scratch"])))
    return rows


def _rows_b(per_seed: list) -> list:
    b0 = per_seed[0]["findings"]["b_interposition_vs_stack"]
    rows = []
    for k, (expected, paper) in enumerate((("not_negative", "similar, or stack better, below ~1 F_c"),
                                           ("negative", "interposition better above ~1 F_c"))):
        rows.append(_row("b", f"final loss, interposition - stack, grown at {b0[k]['sunk_over_fc']:.2f} F_c", expected,
                         paper, _over_seeds(per_seed, lambda f, k=k: f["b_interposition_vs_stack"][k]
                                            ["interposition_minus_stack"])))
    rows.append(_row("b", "change of that difference from the early to the late base", "negative",
                     "interposition's advantage grows with the base's compute",
                     _over_seeds(per_seed, lambda f: f["b_interposition_vs_stack"][1]["interposition_minus_stack"]
                                 - f["b_interposition_vs_stack"][0]["interposition_minus_stack"])))
    return rows


def _alpha(f: dict, alpha: float, key: str) -> float | None:
    return next(row[key] for row in f["c_width_alpha"]["rows"] if row["alpha"] == alpha)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _rows_c(per_seed: list) -> list:
    return [
        _row("c", "final loss, alpha 0.01 - alpha 0", "negative", "alpha 0.01 better than exact copies",
             _over_seeds(per_seed, lambda f: _alpha(f, 0.01, "final_loss") - _alpha(f, 0.0, "final_loss"))),
        _row("c", "cloze accuracy, alpha 0.01 - alpha 0", "positive", "about +1 point",
             _over_seeds(per_seed, lambda f: _minus(_alpha(f, 0.01, "acc"), _alpha(f, 0.0, "acc")))),
        _row("c", "final loss, alpha 0.1 - alpha 0.01", "positive", "0.01 is the best scale tried",
             _over_seeds(per_seed, lambda f: _alpha(f, 0.1, "final_loss") - _alpha(f, 0.01, "final_loss"))),
    ]


def _rows_d(per_seed: list) -> list:
    return [
        _row("d", "Spearman rank correlation (sunk FLOPs, final loss)", "negative",
             "final quality rises with the sunk cost",
             _over_seeds(per_seed, lambda f: f["d_sunk_cost"]["spearman_sunk_vs_final"])),
        _row("d", "final loss, grown from the last save - from the first save", "negative",
             "later checkpoints end better",
             _over_seeds(per_seed, lambda f: f["d_sunk_cost"]["rows"][-1]["final_loss"]
                         - f["d_sunk_cost"]["rows"][1]["final_loss"])),
        _row("d", "cloze accuracy, grown from the last save - from the first save", "positive",
             "later checkpoints end better",
             _over_seeds(per_seed, lambda f: _minus(f["d_sunk_cost"]["rows"][-1]["acc"],
                                                    f["d_sunk_cost"]["rows"][1]["acc"]))),
    ]


def run_stats(per_seed: list) -> dict:
    """Per run: start loss, final loss and cloze accuracy over seeds; per run, the mean validation curve."""
    out = {}
    for name, run in per_seed[0]["runs"].items():
        entry = {}
        for key in ("start_loss", "final_loss"):
            entry[key] = mean_se([s["runs"][name][key] for s in per_seed])
        accs = [(s["runs"][name].get("downstream") or {}).get("acc") for s in per_seed]
        entry["acc"] = mean_se(accs) if None not in accs else None
        xs = [x for x, _ in run["curve"]]
        curves = [[loss for _, loss in s["runs"][name]["curve"]] for s in per_seed]
        if any(len(c) != len(xs) for c in curves):
            raise RuntimeError(f"{name}: seeds evaluated at different points")
        points = [mean_se([c[i] for c in curves]) for i in range(len(xs))]
        entry["curve"] = {"x": xs, "mean": [p["mean"] for p in points], "se": [p["se"] for p in points]}
        out[name] = entry
    return out


def aggregate(per_seed: list) -> dict:
    """Every finding over seeds (``findings``: one row per compared quantity) and every run's statistics."""
    present = per_seed[0]["findings"]
    rows = [row for key, make in (("a_grown_vs_scratch", _rows_a), ("b_interposition_vs_stack", _rows_b),
                                  ("c_width_alpha", _rows_c), ("d_sunk_cost", _rows_d)) if key in present
            for row in make(per_seed)]
    out = {"n_seeds": len(per_seed), "findings": [r for r in rows if r is not None], "runs": run_stats(per_seed)}
    if "d_sunk_cost" in present:
        out["d_levels"] = [{"run": row["run"], "sunk_over_fc": row["sunk_over_fc"]}
                           for row in present["d_sunk_cost"]["rows"]]
        out["monotone_seeds"] = sum(s["findings"]["d_sunk_cost"]["final_loss_monotone_in_sunk"] for s in per_seed)
    return out
