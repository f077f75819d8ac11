"""The four-findings reproduction end to end at --tiny scale (CPU, 2 gloo ranks, one spawn).

Runs ``megatron-grow repro --tiny`` as a user would (the CLI entry, real data,
trainer, offline growth, all runs in one set of spawned processes) and checks that its outputs
are complete and sensible: all four sections, finite losses, equal additional FLOPs inside
every comparison, sunk costs that match the base's checkpoints, the F_c bookkeeping, the
markdown/JSON agreement, the same validation tokens for every run, and real PNG plots. It does
not assert the paper's conclusions (the tiny budgets are far too small for them;
docs/results.md reads the numbers).
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from megatron_grow.__main__ import main


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("repro")
    t0 = time.perf_counter()
    code = main(["repro", "--tiny", "--workdir", str(workdir), "--ranks", "2"])
    seconds = time.perf_counter() - t0
    with open(workdir / "results.json") as f:
        results = json.load(f)
    return {"code": code, "dir": workdir, "r": results, "seconds": seconds}


def test_exits_cleanly(repro):
    assert repro["code"] == 0
    print(f"repro --tiny: {repro['seconds']:.0f}s")  # timing is reported, never asserted (benchmarks/)
    assert repro["r"]["size"]["name"] == "tiny" and repro["r"]["ranks"] == 2


def test_every_loss_finite_and_base_learns(repro):
    r = repro["r"]
    expected = {"base", "interposition", "stack", "scratch_depth", "width_alpha_0", "width_alpha_0.01",
                "width_alpha_0.1"} | {f"interposition_at_{it}" for it in r["checkpoint_iterations"][:-1]}
    assert set(r["runs"]) == expected
    for name, run in r["runs"].items():
        losses = [loss for _, loss in run["curve"]] + [loss for _, loss in run["train_losses"]]
        assert losses and all(math.isfinite(x) for x in losses), name
        assert len(run["curve"]) >= 3, name  # the start evaluation and at least two during training
    base = [loss for _, loss in r["runs"]["base"]["curve"]]
    assert abs(base[0] - math.log(512)) < 0.3, base[0]  # random init predicts ~uniformly
    assert base[0] > base[-1] + 0.5, base
    # Scratch runs start from random init too; every grown run starts far below that.
    scratch_start = r["runs"]["scratch_depth"]["start_loss"]
    assert abs(scratch_start - math.log(512)) < 0.3
    for name, run in r["runs"].items():
        if run["growth"] is not None:
            assert run["start_loss"] < scratch_start - 0.3, name


def test_every_run_evaluated_on_the_same_tokens(repro):
    r = repro["r"]
    digests = {name: run["valid_tokens_sha256"] for name, run in r["runs"].items()}
    assert len(digests) == len(r["runs"]) and all(len(d) == 64 for d in digests.values())
    assert set(digests.values()) == {r["validation"]["tokens_sha256"]}, digests
    assert r["validation"]["samples"] == r["size"]["eval_iters"] * r["size"]["global_batch_size"]
    # Runs of different lengths (the base and every later run) read the same validation samples.
    assert len({run["counters"]["iteration"] for run in r["runs"].values()}) > 1


def test_equal_additional_flops_and_sunk_costs(repro):
    r = repro["r"]
    runs = r["runs"]
    per_step = r["flops_per_base_step"]
    base_c = runs["base"]["counters"]
    assert base_c["iteration"] == r["size"]["base_iters"] and base_c["sunk_flops"] == 0
    assert base_c["flops_so_far"] == pytest.approx(per_step * base_c["iteration"], rel=1e-12)
    for name, run in runs.items():
        c = run["counters"]
        if name == "base":
            continue
        assert c["iteration"] - (run["from_iteration"] or 0) == r["size"]["grown_iters"], name
        assert run["additional_flops"] == c["flops_so_far"] - c["sunk_flops"] > 0, name
        expected_sunk = per_step * run["from_iteration"] if run["growth"] else 0.0
        assert c["sunk_flops"] == pytest.approx(expected_sunk, rel=1e-12, abs=0.0), name
        assert run["curve"][0][0] == 0.0 and run["curve"][-1][0] == pytest.approx(run["additional_flops"]), name
    f = r["findings"]
    groups = {
        "a": [n for p in f["a_grown_vs_scratch"] for n in (p["grown"], p["scratch"])],
        "b": [row["mode"] for row in f["b_interposition_vs_stack"]["rows"]],
        "c": [row["run"] for row in f["c_width_alpha"]["rows"]],
        "d": [row["run"] for row in f["d_sunk_cost"]["rows"]],
    }
    for key, names in groups.items():
        extras = {runs[n]["additional_flops"] for n in names}
        assert len(extras) == 1, (key, names, extras)
    # Same architecture inside each comparison (so equal steps and batch mean equal FLOPs).
    for names in groups.values():
        assert len({json.dumps(runs[n]["model"], sort_keys=True) for n in names}) == 1


def test_four_findings(repro):
    r = repro["r"]
    f = r["findings"]
    assert set(f) == {"a_grown_vs_scratch", "b_interposition_vs_stack", "c_width_alpha", "d_sunk_cost"}
    # (a) the depth pair, with the equal-FLOPs rows from 0 to the end.
    a = f["a_grown_vs_scratch"][0]
    assert a["grown"] == "interposition" and a["scratch"] == "scratch_depth"
    assert a["rows"][0]["additional_flops"] == 0.0
    assert all(row["scratch"] is not None and math.isfinite(row["scratch"]) for row in a["rows"])
    assert a["grown_minus_scratch"] == pytest.approx(a["grown_final"] - a["scratch_final"])
    # (b) the sunk cost in units of F_c = 120 N_a^2, and whether 1x was reached.
    b = f["b_interposition_vs_stack"]
    n_a = b["base_activated_params"]
    assert b["chinchilla_flops"] == pytest.approx(120.0 * n_a * n_a)
    assert b["sunk_over_fc"] == pytest.approx(b["base_sunk_flops"] / b["chinchilla_flops"])
    assert b["base_sunk_flops"] == r["runs"]["base"]["counters"]["flops_so_far"]
    assert b["reached_1x_fc"] == (b["sunk_over_fc"] >= 1.0)
    assert [row["mode"] for row in b["rows"]] == ["interposition", "stack"]
    assert r["runs"]["interposition"]["model"]["layers"] == 2 * r["runs"]["base"]["model"]["layers"]
    # (c) alpha in {0, 0.01, 0.1}; width x2 and top-k x2; the growth keeps most of the base's
    # loss (top-1 sigmoid scores are not renormalised, top-2 ones are: not exactly preserving).
    c = f["c_width_alpha"]
    assert [row["alpha"] for row in c["rows"]] == [0.0, 0.01, 0.1]
    for row in c["rows"]:
        m = r["runs"][row["run"]]["model"]
        assert m["experts"] == 2 * r["runs"]["base"]["model"]["experts"]
        assert m["topk"] == 2 * r["runs"]["base"]["model"]["topk"]
        assert r["runs"][row["run"]]["growth"]["width"]["alpha"] == row["alpha"]
        assert abs(row["start_loss"] - c["base_final_loss"]) < 0.2, row
    # (d) scratch plus the three base checkpoints, in order of sunk cost.
    d = f["d_sunk_cost"]
    assert len(d["rows"]) == 4 and d["rows"][0]["sunk_flops"] == 0.0
    sunk = [row["sunk_flops"] for row in d["rows"]]
    assert sunk == sorted(sunk) and len(set(sunk)) == 4
    assert [row["base_iteration"] for row in d["rows"][1:]] == r["checkpoint_iterations"]
    for row, ck in zip(d["rows"][1:], r["base"]["checkpoints"]):
        assert row["sunk_flops"] == ck["sunk_flops"] and row["base_loss"] == ck["valid_loss"]
        assert abs(row["start_loss"] - row["base_loss"]) < 0.3, row  # depth growth keeps most of it
    # Spearman's rho from its definition, on the rows the report holds (sunk costs are distinct and
    # sorted, so their ranks are 0..n-1): rho = 1 - 6 sum(d_i^2) / (n (n^2 - 1)) without ties.
    finals = [row["final_loss"] for row in d["rows"]]
    n = len(finals)
    assert len(set(finals)) == n, finals  # float losses of four different runs
    final_rank = {v: i for i, v in enumerate(sorted(finals))}
    rho = 1 - 6 * sum((i - final_rank[v]) ** 2 for i, v in enumerate(finals)) / (n * (n * n - 1))
    assert d["spearman_sunk_vs_final"] == pytest.approx(rho, abs=1e-12), (finals, d["spearman_sunk_vs_final"])
    assert d["final_loss_monotone_in_sunk"] == all(x > y for x, y in zip(finals, finals[1:]))


def test_markdown_json_and_plots(repro):
    r = repro["r"]
    md = r["markdown"]
    for header in ("## (a) Grown vs scratch", "## (b) Interposition vs stack", "## (c) Width growth",
                   "## (d) Final loss vs sunk cost"):
        assert header in md
    assert "F_c" in md and ("**reached**" in md or "**not reached**" in md)
    with open(repro["dir"] / "results.md") as f:
        assert f.read().strip() == md.strip()
    # The checkpoints (d) grew from were all kept (keep_last is high enough).
    base_dir = repro["dir"] / "runs" / "base"
    for it in r["checkpoint_iterations"]:
        assert (base_dir / f"iter_{it:07d}").is_dir()
    assert len(r["plots"]) == 4
    for path in r["plots"]:
        assert os.path.dirname(path) == str(repro["dir"])
        with open(path, "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path
