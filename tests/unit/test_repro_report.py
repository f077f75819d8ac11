"""docs/results.md and its plots are what ``megatron-grow repro --report-only`` writes from the raw records
committed under docs/results/repro_cpu/, byte for byte; and the table's numbers recompute here, from
their definitions, out of those records (each run's last validation loss, per-question outcomes).

Report-only reads JSON and draws five plots: seconds, no training."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest

from megatron_grow.__main__ import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAW = os.path.join("docs", "results", "repro_cpu")
PLOTS = ("results_a_grown_vs_scratch.png", "results_b_interposition_vs_stack.png", "results_c_width_alpha.png",
         "results_d_sunk_cost.png", "results_ops_comparisons.png")


def _records() -> tuple[dict, list]:
    with open(os.path.join(REPO, RAW, "study.json")) as f:
        study = json.load(f)
    seeds = []
    for seed in study["seeds"]:
        path = os.path.join(REPO, RAW, f"seed_{seed}.json")
        if os.path.isfile(path):
            with open(path) as f:
                seeds.append(json.load(f))
    return study, seeds


def test_report_only_rebuilds_docs_results_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the report names the raw directory relative to the repository root
    assert main(["repro", "--report-only", "--raw", RAW, "--report-dir", str(tmp_path)]) == 0
    with open(os.path.join(REPO, "docs", "results.md"), "rb") as f:
        assert (tmp_path / "results.md").read_bytes() == f.read()
    for name in PLOTS:
        with open(os.path.join(REPO, "docs", "img", name), "rb") as f:
            assert (tmp_path / "img" / name).read_bytes() == f.read(), name


def test_report_only_without_records_is_a_one_line_error(tmp_path, capsys):
    assert main(["repro", "--report-only", "--raw", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "study.json does not exist" in err[0]


def _final(rec: dict, name: str) -> float:
    return rec["results"][name]["valid_losses"][-1][1]  # (iteration, loss, FLOPs) of the last evaluation


def _row(md: str, quantity: str) -> list:
    line = next(ln for ln in md.splitlines() if ln.startswith("| (") and f"| {quantity} |" in ln)
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_rows_recompute_from_the_raw_records():
    """Mean, seed SE (sample SD / sqrt n) and per-seed values of three rows, from the records alone."""
    study, seeds = _records()
    with open(os.path.join(REPO, "docs", "results.md"), encoding="utf-8") as f:
        md = f.read()
    last = study["save_iterations"][-1]
    rows = {
        "final loss, grown - scratch (depth interposition x2)":
            [_final(r, f"interposition_at_{last}") - _final(r, "scratch_depth") for r in seeds],
        "final loss, alpha 0 - alpha 0.01": [_final(r, "width_alpha_0") - _final(r, "width_alpha_0.01") for r in seeds],
    }
    # An arm shorter than the reference is compared with the reference's evaluation at the same iteration
    # (same architecture: the same additional FLOPs).
    carry = "final loss, Adam moments carried (optimizer: carry)"
    steps = seeds[0]["results"]["width_carry"]["iteration"] - last
    reference_at = [{it: loss for it, loss, _ in r["results"]["width_alpha_0.01"]["valid_losses"]}[last + steps]
                    for r in seeds]
    label = f"{carry} - reference, equal steps" if steps == study["size"]["grown_iters"] else \
        f"{carry} ({steps} steps) - reference, equal additional FLOPs"
    rows[label] = [_final(r, "width_carry") - ref for r, ref in zip(seeds, reference_at)]
    for quantity, values in rows.items():
        cells = _row(md, quantity)
        mean, se = statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))
        assert cells[3] == f"{mean:+.4f} ± {se:.4f}", quantity
        assert cells[6] == ", ".join(f"{v:+.4f}" for v in values), quantity


def test_accuracies_and_question_errors_recompute_from_per_question_outcomes():
    """Held-out accuracy = mean of the per-question outcomes; the question-sampling SE of the paired
    grown - scratch difference = SD / sqrt(n) of the per-question differences averaged over seeds."""
    study, seeds = _records()
    last = study["save_iterations"][-1]
    with open(os.path.join(REPO, "docs", "results.md"), encoding="utf-8") as f:
        md = f.read()
    per_seed = []
    for r in seeds:
        g = r["results"][f"interposition_at_{last}"]["downstream"]
        s = r["results"]["scratch_depth"]["downstream"]
        for score in (g, s):
            assert score["acc"] == pytest.approx(sum(score["acc_per_question"]) / len(score["acc_per_question"]))
        per_seed.append([a - b for a, b in zip(g["acc_per_question"], s["acc_per_question"])])
    n = len(per_seed[0])
    assert n >= 625  # one score's binomial SE <= sqrt(0.25 / n) <= 0.02
    averaged = [sum(d[i] for d in per_seed) / len(per_seed) for i in range(n)]
    question_se = statistics.stdev(averaged) / math.sqrt(n)
    cells = _row(md, "held-out accuracy, grown - scratch (depth interposition x2)")
    assert cells[4] == f"{question_se:.3f}"
    assert cells[6] == ", ".join(f"{sum(d) / n:+.3f}" for d in per_seed)
