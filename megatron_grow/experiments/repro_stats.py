"""The reproduction over seeds: every finding as a mean paired difference with its standard error.

A difference is computed inside each seed (both runs saw the same base, data order and validation
tokens), then averaged over seeds: mean, standard error s / sqrt(n) with the sample standard
deviation s (n - 1 in the denominator), and the two-sided 95 % interval mean +- t(0.975, n - 1) SE
(Student's t, from scipy). A finding is *reproduced* when that interval lies on the paper's side
of zero, *contradicted* when it lies on the other side, and otherwise *within noise* (the sign of
the mean is reported); where the paper expects a tie or a positive difference, an interval that
contains zero is *consistent*. With 3 seeds, t = 4.30: only large, consistent differences count.

Multiplicity: each row's two-sided p of the same t test (p < 0.05 exactly when the interval
excludes zero) is adjusted by Holm's step-down method across the table's rows
(:func:`holm_adjusted`), and :func:`holm_verdict` states the row's verdict at the adjusted p;
Holm keeps the chance of any false "reproduced"/"contradicted" in the table at or below 0.05.

Two kinds of error for a downstream accuracy: the *seed* SE above (runs vary with the seed), and
the *question-sampling* SE (the task is a sample of questions): for one score
sqrt(p (1 - p) / (n - 1)), the sample SE of n 0/1 outcomes (lm-eval's); for a difference of two
models on the same questions the SE of the per-question paired differences
(:func:`paired_accuracy_difference`); over seeds, of the per-question outcomes averaged over
seeds (:func:`accuracy_errors`, :func:`paired_accuracy_errors`).

Finding (d) (final loss falls as the sunk cost rises) is tested inside each seed by the order of
its runs (:func:`ordering_test`): under the null hypothesis that the sunk cost does not matter,
every order of the k runs' final losses is equally likely, so the one-sided p of a seed is the
chance of at most its number of out-of-order pairs (Kendall's inversions; exactly ordered:
1 / k!); seeds are independent, so the chance that m or more of n seeds are exactly ordered is a
binomial tail with success probability 1 / k!.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from scipy import stats

# What the paper expects of each difference (docs/paper.md): "negative" / "positive" = that side of
# zero; "not_negative" = zero or positive (stack ties or wins before ~1 F_c, docs/paper.md §1.3); "zero" = about
# the same (alpha 0's loss, docs/paper.md §2.1); "none" = no claim of the paper (a control or a comparison of
# options: the verdict says which side is lower, if either clearly is).
EXPECTATIONS = ("negative", "positive", "not_negative", "zero", "none")


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
    if expected in ("zero", "none"):
        return _two_sided(expected, lo > 0 or hi < 0, stat["mean"])
    if expected == "negative":
        return "reproduced" if hi < 0 else "contradicted" if lo > 0 else _noise(stat["mean"] < 0)
    if expected == "positive":
        return "reproduced" if lo > 0 else "contradicted" if hi < 0 else _noise(stat["mean"] > 0)
    # not_negative: a tie is what the paper describes; only a clear negative contradicts it.
    return "contradicted" if hi < 0 else "reproduced" if lo > 0 else "consistent (no clear difference)"


def _two_sided(expected: str, clear: bool, mean: float) -> str:
    """The verdict of a difference the paper expects to be about zero, or makes no claim about."""
    if expected == "zero":
        return "contradicted (a clear difference)" if clear else "consistent (no clear difference)"
    return ("first lower" if mean < 0 else "first higher") if clear else "no clear difference"


def _noise(paper_side: bool) -> str:
    return "within noise (mean on the paper's side)" if paper_side else "within noise (mean on the other side)"


def t_test_p(stat: dict) -> float | None:
    """Two-sided p of the t test of ``mean = 0`` for a :func:`mean_se` result (None where n < 2).

    A zero standard error (every seed equal) gives p = 0 for a non-zero mean and 1 for a zero one."""
    if stat["se"] is None:
        return None
    if stat["se"] == 0.0:
        return 1.0 if stat["mean"] == 0.0 else 0.0
    return float(2.0 * stats.t.sf(abs(stat["mean"]) / stat["se"], stat["n"] - 1))


def holm_adjusted(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the input order (None entries are left out of the family).

    With the m p-values sorted, p_(1) <= ... <= p_(m): adjusted p_(i) = max over j <= i of
    min(1, (m - j + 1) p_(j)); rejecting where adjusted p < alpha controls the family-wise error at alpha."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(present)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def holm_verdict(mean: float, p_adjusted: float | None, expected: str, alpha: float = 0.05) -> str:
    """The verdict of :func:`verdict` with significance decided by a Holm-adjusted p instead of the interval."""
    if expected not in EXPECTATIONS:
        raise ValueError(f"unknown expectation {expected!r}")
    if p_adjusted is None:
        return "one seed: no error bar"
    if expected in ("zero", "none"):
        return _two_sided(expected, p_adjusted < alpha, mean)
    if p_adjusted >= alpha:
        if expected == "not_negative":
            return "consistent (no clear difference)"
        return _noise(mean < 0 if expected == "negative" else mean > 0)
    if expected == "negative":
        return "reproduced" if mean < 0 else "contradicted"
    return "reproduced" if mean > 0 else "contradicted"


def with_holm(rows: list, alpha: float = 0.05) -> list:
    """``rows`` (each with :func:`mean_se`'s keys, ``expected``) with ``p``, ``p_holm`` and ``verdict_holm`` added."""
    ps = [t_test_p(row) for row in rows]
    return [dict(row, p=p, p_holm=adj, verdict_holm=holm_verdict(row["mean"], adj, row["expected"], alpha))
            for row, p, adj in zip(rows, ps, holm_adjusted(ps))]


def accuracy_question_se(correct: Sequence[float]) -> float:
    """Question-sampling SE of a mean over questions: sample SD (n - 1) / sqrt(n); for 0/1 outcomes
    sqrt(p (1 - p) / (n - 1)). ``correct`` may be per-question outcomes averaged over seeds."""
    n = len(correct)
    if n < 2:
        raise ValueError(f"a question-sampling SE needs at least 2 questions, got {n}")
    mean = sum(correct) / n
    return math.sqrt(sum((c - mean) ** 2 for c in correct) / (n - 1) / n)


def paired_accuracy_difference(correct_a: Sequence[float], correct_b: Sequence[float]) -> dict:
    """Accuracy of A minus that of B on the same questions, with the SE of the per-question differences."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired outcomes need the same questions: {len(correct_a)} vs {len(correct_b)}")
    diffs = [a - b for a, b in zip(correct_a, correct_b)]
    return {"n": len(diffs), "mean": sum(diffs) / len(diffs), "question_se": accuracy_question_se(diffs)}


def _per_question_mean(per_seed: Sequence[Sequence[float]]) -> list[float]:
    if len({len(c) for c in per_seed}) != 1:
        raise ValueError("seeds were scored on different numbers of questions")
    return [sum(outcomes) / len(per_seed) for outcomes in zip(*per_seed)]


def accuracy_errors(per_seed_correct: Sequence[Sequence[float]]) -> dict:
    """One model's accuracy over seeds: the mean, the seed statistics (:func:`mean_se` of the per-seed
    accuracies) and the question-sampling SE of the per-question outcomes averaged over seeds."""
    accs = [sum(c) / len(c) for c in per_seed_correct]
    return {"mean": sum(accs) / len(accs), "seed": mean_se(accs),
            "question_se": accuracy_question_se(_per_question_mean(per_seed_correct))}


def paired_accuracy_errors(per_seed_a: Sequence[Sequence[float]], per_seed_b: Sequence[Sequence[float]]) -> dict:
    """A minus B over seeds (same questions, paired within each seed): the mean, the seed statistics of the
    per-seed differences and the question-sampling SE of the per-question differences averaged over seeds."""
    if len(per_seed_a) != len(per_seed_b):
        raise ValueError(f"paired outcomes need the same seeds: {len(per_seed_a)} vs {len(per_seed_b)}")
    diffs = [paired_accuracy_difference(a, b) for a, b in zip(per_seed_a, per_seed_b)]
    per_question = [[x - y for x, y in zip(a, b)] for a, b in zip(per_seed_a, per_seed_b)]
    return {"mean": sum(d["mean"] for d in diffs) / len(diffs), "seed": mean_se([d["mean"] for d in diffs]),
            "question_se": accuracy_question_se(_per_question_mean(per_question))}


def inversions(values: Sequence[float], decreasing: bool = True) -> int:
    """Pairs i < j out of the expected order (for ``decreasing``: values[i] <= values[j]; a tie counts as out)."""
    return sum(1 for i in range(len(values)) for j in range(i + 1, len(values))
               if (values[i] <= values[j] if decreasing else values[i] >= values[j]))


def inversion_counts(k: int) -> list[int]:
    """How many orders of k distinct items have 0, 1, ... k(k-1)/2 inversions (the Mahonian numbers)."""
    counts = [1]
    for j in range(2, k + 1):  # inserting the j-th item adds 0..j-1 inversions
        counts = [sum(counts[i - t] for t in range(j) if 0 <= i - t < len(counts))
                  for i in range(len(counts) + j - 1)]
    return counts


def ordering_test(per_seed_values: Sequence[Sequence[float]], decreasing: bool = True) -> dict:
    """Whether each seed's values come out in the expected order (see the module docstring for the test).

    Returns ``per_seed`` (``inversions``, one-sided ``p``), ``ordered_seeds``, ``n_seeds``, ``all_ordered``,
    ``p_exact_order`` (1 / k!) and ``p_ordered_seeds`` (chance of at least that many exactly ordered seeds)."""
    k = len(per_seed_values[0])
    if k < 2 or any(len(v) != k for v in per_seed_values):
        raise ValueError("every seed needs the same number (>= 2) of values")
    counts = inversion_counts(k)
    total = math.factorial(k)
    per_seed = []
    for values in per_seed_values:
        inv = inversions(values, decreasing)
        per_seed.append({"inversions": inv, "p": sum(counts[: inv + 1]) / total})
    n, ordered = len(per_seed), sum(s["inversions"] == 0 for s in per_seed)
    q = 1.0 / total
    tail = sum(math.comb(n, i) * q ** i * (1 - q) ** (n - i) for i in range(ordered, n + 1))
    return {"k": k, "per_seed": per_seed, "ordered_seeds": ordered, "n_seeds": n, "all_ordered": ordered == n,
            "p_exact_order": q, "p_ordered_seeds": tail}


def _row(finding: str, quantity: str, expected: str, paper: str, values: list) -> dict | None:
    if not values or any(v is None for v in values):
        return None
    stat = mean_se(values)
    return dict(stat, finding=finding, quantity=quantity, expected=expected, paper=paper,
                verdict=verdict(stat, expected))


def _over_seeds(per_seed: list, pick: Callable[[dict], float | None]) -> list:
    return [pick(s["findings"]) for s in per_seed]


def _acc_row(finding: str, quantity: str, expected: str, paper: str, per_seed: list, pick_a, pick_b) -> dict | None:
    """A paired accuracy difference: the seed statistics (as :func:`_row`) and the question-sampling SE
    of the per-question differences averaged over seeds (None without per-question outcomes)."""
    row = _row(finding, quantity, expected, paper, _over_seeds(per_seed, lambda f: _minus(pick_a(f, "acc"),
                                                                                          pick_b(f, "acc"))))
    if row is None:
        return None
    a = _over_seeds(per_seed, lambda f: pick_a(f, "acc_per_question"))
    b = _over_seeds(per_seed, lambda f: pick_b(f, "acc_per_question"))
    row["question_se"] = None if None in a or None in b else paired_accuracy_errors(a, b)["question_se"]
    return row


def _rows_a(per_seed: list) -> list:
    rows = []
    pairs = per_seed[0]["findings"]["a_grown_vs_scratch"]
    for k, pair in enumerate(pairs):
        def side(key_prefix: str, k=k):
            return lambda f, what: f["a_grown_vs_scratch"][k][f"{key_prefix}_{what}"]
        if pair["other"] == "continue_base":
            rows.append(_row("a", "final loss, grown - the base trained on at the grown run's additional FLOPs",
                             "none", "no claim (the alternative a user weighs)",
                             _over_seeds(per_seed, lambda f, k=k: f["a_grown_vs_scratch"][k]["grown_minus_other"])))
            rows.append(_acc_row("a", "held-out accuracy, grown - the base trained on", "none",
                                 "no claim (the alternative a user weighs)", per_seed, side("grown"), side("other")))
            continue
        rows.append(_row("a", f"final loss, grown - scratch ({pair['label']})", "negative",
                         "grown beats scratch at equal additional FLOPs",
                         _over_seeds(per_seed, lambda f, k=k: f["a_grown_vs_scratch"][k]["grown_minus_other"])))
        rows.append(_acc_row("a", f"held-out accuracy, grown - scratch ({pair['label']})", "positive",
                             "+6.2 points at 70B", per_seed, side("grown"), side("other")))
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
    """As the paper states (c): alpha 0 reaches about the same loss as alpha 0.01 and about 1 point lower
    accuracy (docs/paper.md §2.1)."""
    def alpha(a: float):
        return lambda f, key: _alpha(f, a, key)
    return [
        _row("c", "final loss, alpha 0 - alpha 0.01", "zero", "about the same loss",
             _over_seeds(per_seed, lambda f: _alpha(f, 0.0, "final_loss") - _alpha(f, 0.01, "final_loss"))),
        _acc_row("c", "held-out accuracy, alpha 0.01 - alpha 0", "positive", "about +1 point",
                 per_seed, alpha(0.01), alpha(0.0)),
    ]


def _rows_ops(per_seed: list) -> list:
    """Each option against width x2 with alpha 0.01 from the same save: no claim of the paper."""
    rows = []
    for k, arm in enumerate(per_seed[0]["findings"]["ops_comparisons"]["rows"]):
        rows.append(_row("ops", f"final loss, {arm['label']} - reference, equal steps", "none", "-",
                         _over_seeds(per_seed, lambda f, k=k: f["ops_comparisons"]["rows"][k]["minus_reference"])))
        if abs(arm["flops_ratio"] - 1.0) > 1e-6:  # top-k fixed spends fewer FLOPs per step; an arm may be shorter
            steps = f" ({arm['steps']} steps)" if arm["minus_reference"] is None else ""
            rows.append(_row("ops", f"final loss, {arm['label']}{steps} - reference, equal additional FLOPs", "none",
                             "-",
                             _over_seeds(per_seed, lambda f, k=k: f["ops_comparisons"]["rows"][k]
                                         ["minus_reference_at_equal_flops"])))
    return rows


def _rows_d(per_seed: list) -> list:
    # The order of all of a seed's runs is tested by ordering_test (aggregate's "d_ordering"), not by a
    # mean Spearman correlation: with every seed at -1 its interval has zero width.
    return [
        _row("d", "final loss, grown from the last save - from the first save", "negative",
             "later checkpoints end better",
             _over_seeds(per_seed, lambda f: f["d_sunk_cost"]["rows"][-1]["final_loss"]
                         - f["d_sunk_cost"]["rows"][1]["final_loss"])),
        _row("d", "held-out accuracy, grown from the last save - from the first save", "positive",
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
                                  ("c_width_alpha", _rows_c), ("d_sunk_cost", _rows_d),
                                  ("ops_comparisons", _rows_ops)) if key in present
            for row in make(per_seed)]
    out = {"n_seeds": len(per_seed), "findings": with_holm([r for r in rows if r is not None]),
           "runs": run_stats(per_seed)}
    if "d_sunk_cost" in present:
        out["d_levels"] = [{"run": row["run"], "sunk_over_fc": row["sunk_over_fc"]}
                           for row in present["d_sunk_cost"]["rows"]]
        out["monotone_seeds"] = sum(s["findings"]["d_sunk_cost"]["final_loss_monotone_in_sunk"] for s in per_seed)
        # Final loss in order of rising sunk cost (scratch first): expected to fall.
        out["d_ordering"] = ordering_test([[row["final_loss"] for row in sorted(
            s["findings"]["d_sunk_cost"]["rows"], key=lambda row: row["sunk_flops"])] for s in per_seed])
    return out
