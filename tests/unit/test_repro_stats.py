"""The reproduction's statistics over seeds, against values worked out by hand from the definitions."""

from __future__ import annotations

import math

import pytest

from megatron_grow.experiments.repro_stats import (
    accuracy_errors,
    accuracy_question_se,
    aggregate,
    holm_adjusted,
    holm_verdict,
    inversion_counts,
    mean_se,
    ordering_test,
    paired_accuracy_difference,
    paired_accuracy_errors,
    t_test_p,
    verdict,
    with_holm,
)


def test_mean_se_and_the_t_interval():
    # values 1, 2, 3: mean 2, sample sd 1, SE 1/sqrt(3); t(0.975, 2) = 4.302652730 (standard table).
    st = mean_se([1.0, 2.0, 3.0])
    assert st["n"] == 3 and st["mean"] == 2.0
    assert st["se"] == pytest.approx(1.0 / math.sqrt(3.0))
    half = 4.302652730 / math.sqrt(3.0)
    assert st["ci95"] == pytest.approx([2.0 - half, 2.0 + half], rel=1e-8)
    # Two values -0.1, -0.3: mean -0.2, sd sqrt(0.02), SE 0.1; t(0.975, 1) = 12.706204736.
    st = mean_se([-0.1, -0.3])
    assert st["mean"] == pytest.approx(-0.2) and st["se"] == pytest.approx(0.1)
    assert st["ci95"] == pytest.approx([-0.2 - 1.2706204736, -0.2 + 1.2706204736], rel=1e-8)
    one = mean_se([0.5])
    assert one["se"] is None and one["ci95"] is None and verdict(one, "negative") == "one seed: no error bar"


def _stat(lo: float, hi: float) -> dict:
    return {"mean": (lo + hi) / 2, "ci95": [lo, hi]}


@pytest.mark.parametrize("lo,hi,expected,answer", [
    (-0.3, -0.1, "negative", "reproduced"),
    (0.1, 0.3, "negative", "contradicted"),
    (-0.3, 0.1, "negative", "within noise (mean on the paper's side)"),
    (-0.1, 0.3, "negative", "within noise (mean on the other side)"),
    (0.1, 0.3, "positive", "reproduced"),
    (-0.3, -0.1, "positive", "contradicted"),
    (-0.1, 0.3, "positive", "within noise (mean on the paper's side)"),
    (-0.2, 0.2, "not_negative", "consistent (no clear difference)"),
    (0.1, 0.2, "not_negative", "reproduced"),
    (-0.2, -0.1, "not_negative", "contradicted"),
])
def test_verdicts(lo, hi, expected, answer):
    assert verdict(_stat(lo, hi), expected) == answer


def test_unknown_expectation_is_refused():
    with pytest.raises(ValueError, match="unknown expectation"):
        verdict(_stat(-1, 1), "smaller")


def test_t_test_p_of_a_row():
    # 1, 2, 3: t = 2 / (1 / sqrt 3) = 2 sqrt 3 with 2 degrees of freedom, whose CDF is 1/2 + t / (2 sqrt(2 + t^2));
    # two-sided p = 1 - t / sqrt(2 + t^2) = 1 - 2 sqrt 3 / sqrt 14.
    assert t_test_p(mean_se([1.0, 2.0, 3.0])) == pytest.approx(1.0 - 2.0 * math.sqrt(3.0) / math.sqrt(14.0), rel=1e-9)
    assert t_test_p(mean_se([0.5])) is None
    assert t_test_p(mean_se([-0.5, -0.5, -0.5])) == 0.0 and t_test_p(mean_se([0.0, 0.0])) == 1.0


def test_holm_step_down_by_hand():
    # Sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> raised to 0.06 (monotone).
    adjusted = holm_adjusted([0.01, 0.04, 0.03, 0.005, None])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and adjusted[4] is None
    assert holm_adjusted([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


@pytest.mark.parametrize("mean,p,expected,answer", [
    (-0.1, 0.01, "negative", "reproduced"),
    (0.1, 0.01, "negative", "contradicted"),
    (-0.1, 0.06, "negative", "within noise (mean on the paper's side)"),
    (0.1, 0.01, "positive", "reproduced"),
    (0.1, 0.2, "positive", "within noise (mean on the paper's side)"),
    (-0.1, 0.2, "positive", "within noise (mean on the other side)"),
    (-0.1, 0.01, "not_negative", "contradicted"),
    (0.1, 0.01, "not_negative", "reproduced"),
    (-0.1, 0.3, "not_negative", "consistent (no clear difference)"),
    (-0.1, None, "negative", "one seed: no error bar"),
])
def test_holm_verdicts(mean, p, expected, answer):
    assert holm_verdict(mean, p, expected) == answer


def _three(mean: float, t: float) -> dict:
    """Three values mean - d, mean, mean + d with t = |mean| / (d / sqrt 3) (their sample SD is d)."""
    d = abs(mean) * math.sqrt(3.0) / t if t else 1.0
    return dict(mean_se([mean - d, mean, mean + d]), expected="negative")


def test_with_holm_can_turn_a_reproduction_into_noise():
    # With 2 degrees of freedom the two-sided p of t is 1 - t / sqrt(2 + t^2): t = 20 -> 0.00249,
    # t = 5 -> 0.03775 (< 0.05 alone: "reproduced"), t = 0 -> 1. Holm over the three: 3 x 0.00249 = 0.00747,
    # 2 x 0.03775 = 0.0755 (> 0.05: within noise), 1 x 1 = 1.
    p_of = [1 - t / math.sqrt(2 + t * t) for t in (20.0, 5.0, 0.0)]
    rows = with_holm([_three(-1.0, 20.0), _three(-1.0, 5.0), _three(0.0, 0.0)])
    assert [r["p"] for r in rows] == pytest.approx(p_of, rel=1e-6)
    assert [r["p_holm"] for r in rows] == pytest.approx([3 * p_of[0], 2 * p_of[1], 1.0], rel=1e-6)
    assert [verdict(r, "negative") for r in rows[:2]] == ["reproduced"] * 2
    assert [r["verdict_holm"] for r in rows] == [
        "reproduced", "within noise (mean on the paper's side)", "within noise (mean on the other side)"]


def test_question_sampling_errors_by_hand():
    a, b = [1, 1, 0, 1, 0], [1, 0, 0, 0, 1]
    # a: p = 0.6, SE sqrt(0.6 * 0.4 / 4) = sqrt(0.06).
    assert accuracy_question_se(a) == pytest.approx(math.sqrt(0.06))
    # differences 0, 1, 0, 1, -1: mean 0.2, squared deviations 0.04 + 0.64 + 0.04 + 0.64 + 1.44 = 2.8,
    # variance 2.8 / 4 = 0.7, SE sqrt(0.7 / 5).
    paired = paired_accuracy_difference(a, b)
    assert paired["mean"] == pytest.approx(0.2) and paired["question_se"] == pytest.approx(math.sqrt(0.14))
    with pytest.raises(ValueError, match="same questions"):
        paired_accuracy_difference(a, b[:4])


def test_errors_over_seeds_by_hand():
    # Two seeds, four questions. Accuracies 0.75 and 0.25: seed mean 0.5, seed SE |0.75 - 0.25| / 2 = 0.25.
    # Per-question means 1, 0.5, 0.5, 0: mean 0.5, squared deviations 0.25 + 0 + 0 + 0.25, variance 0.5 / 3,
    # question SE sqrt(0.5 / 3 / 4).
    seeds = [[1, 1, 1, 0], [1, 0, 0, 0]]
    errors = accuracy_errors(seeds)
    assert errors["mean"] == pytest.approx(0.5) and errors["seed"]["se"] == pytest.approx(0.25)
    assert errors["question_se"] == pytest.approx(math.sqrt(0.5 / 12))
    # B: [0, 1, 1, 0], [1, 0, 0, 0] -> per-seed differences 0.25 and 0 (mean 0.125, seed SE 0.125);
    # per-question differences (1, 0, 0, 0) and (0, 0, 0, 0), averaged over seeds 0.5, 0, 0, 0: mean 0.125,
    # squared deviations 0.140625 + 3 x 0.015625 = 0.1875, variance 0.0625, question SE sqrt(0.0625 / 4) = 0.125.
    paired = paired_accuracy_errors(seeds, [[0, 1, 1, 0], [1, 0, 0, 0]])
    assert paired["mean"] == pytest.approx(0.125) and paired["seed"]["se"] == pytest.approx(0.125)
    assert paired["question_se"] == pytest.approx(0.125)


def test_ordering_test_by_hand():
    # 3 items: orders with 0, 1, 2, 3 inversions number 1, 2, 2, 1 (of 3! = 6).
    assert inversion_counts(3) == [1, 2, 2, 1] and sum(inversion_counts(5)) == 120
    assert inversion_counts(4) == [1, 3, 5, 6, 5, 3, 1]
    result = ordering_test([[3.0, 2.0, 1.0], [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    assert [s["inversions"] for s in result["per_seed"]] == [0, 1, 3]
    assert [s["p"] for s in result["per_seed"]] == pytest.approx([1 / 6, 3 / 6, 1.0])
    # 1 of 3 seeds exactly ordered, q = 1/6: P(at least 1) = 1 - (5/6)^3.
    assert result["ordered_seeds"] == 1 and not result["all_ordered"]
    assert result["p_ordered_seeds"] == pytest.approx(1 - (5 / 6) ** 3)
    five = ordering_test([[5.0, 4.0, 3.0, 2.0, 1.0]] * 3)  # all 3 seeds ordered: (1/120)^3
    assert five["all_ordered"] and five["per_seed"][0]["p"] == pytest.approx(1 / 120)
    assert five["p_ordered_seeds"] == pytest.approx((1 / 120) ** 3)
    assert ordering_test([[1.0, 1.0]])["per_seed"][0]["inversions"] == 1  # a tie is not in order
    assert ordering_test([[1.0, 2.0]], decreasing=False)["per_seed"][0]["p"] == pytest.approx(0.5)


def _seed_with_d(finals_by_sunk: list, acc: float) -> dict:
    # Rows listed out of sunk order on purpose: the ordering is by sunk FLOPs, not by list position.
    rows = [{"run": f"r{i}", "sunk_flops": float(i), "sunk_over_fc": i / 4, "final_loss": loss, "acc": acc}
            for i, loss in enumerate(finals_by_sunk)]
    run = {"start_loss": 5.0, "final_loss": finals_by_sunk[-1], "curve": [[0.0, 5.0], [1.0, finals_by_sunk[-1]]]}
    return {"findings": {"d_sunk_cost": {"rows": rows[::-1], "final_loss_monotone_in_sunk": True}},
            "runs": {"r0": run}}


def test_aggregate_reports_holm_and_the_per_seed_order_for_d():
    per_seed = [_seed_with_d([4.0, 3.5, 3.2, 3.1], 0.3), _seed_with_d([4.1, 3.4, 3.3, 3.0], 0.3),
                _seed_with_d([4.0, 3.6, 3.1, 3.2], 0.3)]
    agg = aggregate(per_seed)
    assert [s["inversions"] for s in agg["d_ordering"]["per_seed"]] == [0, 0, 1]
    # 4 runs: 1 of 24 orders is exact; 1 + 3 of 24 have at most one inversion.
    assert [s["p"] for s in agg["d_ordering"]["per_seed"]] == pytest.approx([1 / 24, 1 / 24, 4 / 24])
    assert not any("Spearman" in row["quantity"] for row in agg["findings"])
    assert all({"p", "p_holm", "verdict_holm"} <= set(row) for row in agg["findings"])
