"""The reproduction's statistics over seeds, against values worked out by hand from the definitions."""

from __future__ import annotations

import math

import pytest

from megatron_grow.experiments.repro_stats import mean_se, verdict


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
