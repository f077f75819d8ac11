"""The four-findings reproduction end to end at --tiny scale (CPU, 2 gloo ranks per seed, 2 seeds).

Runs ``megatron-grow repro --tiny`` as a user would (the CLI entry, real data, trainer, offline
growth, lm-eval scoring) and checks the machinery, not the science (the tiny base is far below
1x F_c; docs/results.md reads the real run): finite losses, equal additional FLOPs inside every
comparison, sunk costs that match the base's saves, the F_c bookkeeping, the same validation
tokens for every run of every seed, the statistics over seeds recomputed here from their
definitions, the markdown, and real PNG plots; then ``--report-only`` rebuilds the same report.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import pytest

from megatron_grow.__main__ import main

# Two-sided 95 % Student t quantiles t(0.975, dof) from the standard table.
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305}


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
    r = repro["r"]
    assert r["size"]["name"] == "tiny" and r["ranks"] == 2 and r["seeds"] == [1234, 1235]


def _expected_runs(saves: list) -> set:
    first, last = saves[0], saves[-1]
    return ({"base", "scratch_depth", f"stack_at_{first}", f"stack_at_{last}", "width_alpha_0", "width_alpha_0.01",
             "width_alpha_0.1"} | {f"interposition_at_{it}" for it in saves})


def test_every_loss_finite_and_base_learns(repro):
    for s in repro["r"]["per_seed"]:
        assert set(s["runs"]) == _expected_runs(s["save_iterations"])
        for name, run in s["runs"].items():
            losses = [loss for _, loss in run["curve"]] + [loss for _, loss in run["train_losses"]]
            assert losses and all(math.isfinite(x) for x in losses), name
            assert len(run["curve"]) >= 3, name  # the start evaluation and at least two during training
        base = [loss for _, loss in s["runs"]["base"]["curve"]]
        assert abs(base[0] - math.log(512)) < 0.3, base[0]  # random init predicts ~uniformly
        assert base[0] > base[-1] + 0.5, base
        scratch_start = s["runs"]["scratch_depth"]["start_loss"]
        assert abs(scratch_start - math.log(512)) < 0.3
        base_at = {ck["iteration"]: ck["valid_loss"] for ck in s["base"]["saves"]}
        for name, run in s["runs"].items():
            if run["growth"] is not None:  # a grown run starts near its source's loss, below random init
                assert run["start_loss"] < scratch_start, name
                assert abs(run["start_loss"] - base_at[run["from_iteration"]]) < 0.3, name


def test_every_run_of_every_seed_evaluated_on_the_same_tokens(repro):
    r = repro["r"]
    digests = {(s["seed"], name): run["valid_tokens_sha256"] for s in r["per_seed"] for name, run in s["runs"].items()}
    assert all(len(d) == 64 for d in digests.values())
    assert set(digests.values()) == {r["validation"]["tokens_sha256"]}
    assert r["validation"]["samples"] == r["size"]["eval_iters"] * r["size"]["global_batch_size"]
    # ... although the seeds trained on different data orders: their train losses differ from step 1.
    first = [s["runs"]["base"]["train_losses"][0][1] for s in r["per_seed"]]
    assert first[0] != first[1]


def test_equal_additional_flops_and_sunk_costs(repro):
    r = repro["r"]
    for s in r["per_seed"]:
        runs, per_step = s["runs"], s["flops_per_base_step"]
        base_c = runs["base"]["counters"]
        assert base_c["iteration"] == r["size"]["base_iters"] == s["save_iterations"][-1] and base_c["sunk_flops"] == 0
        assert base_c["flops_so_far"] == pytest.approx(per_step * base_c["iteration"], rel=1e-12)
        for name, run in runs.items():
            if name == "base":
                continue
            c = run["counters"]
            assert c["iteration"] - (run["from_iteration"] or 0) == r["size"]["grown_iters"], name
            assert run["additional_flops"] == c["flops_so_far"] - c["sunk_flops"] > 0, name
            expected_sunk = per_step * run["from_iteration"] if run["growth"] else 0.0
            assert c["sunk_flops"] == pytest.approx(expected_sunk, rel=1e-12, abs=0.0), name
            assert run["curve"][0][0] == 0.0 and run["curve"][-1][0] == pytest.approx(run["additional_flops"]), name
        f = s["findings"]
        groups = [[n for p in f["a_grown_vs_scratch"] for n in (p["grown"], p["scratch"])],
                  [row["run"] for row in f["c_width_alpha"]["rows"]], [row["run"] for row in f["d_sunk_cost"]["rows"]]]
        groups += [[f"interposition_at_{row['base_iteration']}", f"stack_at_{row['base_iteration']}"]
                   for row in f["b_interposition_vs_stack"]]
        for names in groups:  # same architecture, steps and batch: the same additional FLOPs
            assert len({runs[n]["additional_flops"] for n in names}) == 1, names
            assert len({json.dumps(runs[n]["model"], sort_keys=True) for n in names}) == 1, names


def test_chinchilla_bookkeeping_and_saves(repro):
    r = repro["r"]
    for s in r["per_seed"]:
        n_a = s["base"]["activated_params"]
        assert s["base"]["chinchilla_flops"] == pytest.approx(120.0 * n_a * n_a)
        saves = s["save_iterations"]
        assert [it // saves[0] for it in saves] == [1, 2, 4, 8]
        for ck in s["base"]["saves"]:
            assert ck["sunk_flops"] == pytest.approx(s["flops_per_base_step"] * ck["iteration"], rel=1e-12)
            assert ck["sunk_over_fc"] == pytest.approx(ck["sunk_flops"] / s["base"]["chinchilla_flops"])
        b = s["findings"]["b_interposition_vs_stack"]
        assert [row["base_iteration"] for row in b] == [saves[0], saves[-1]]
        for row in b:
            assert row["interposition_minus_stack"] == pytest.approx(row["interposition_final"] - row["stack_final"])
        d = s["findings"]["d_sunk_cost"]
        assert [row["base_iteration"] for row in d["rows"]] == [0] + saves
        finals = [row["final_loss"] for row in d["rows"]]
        n = len(finals)  # Spearman without ties: 1 - 6 sum(d_i^2) / (n (n^2 - 1)); sunk costs are sorted
        rank = {v: i for i, v in enumerate(sorted(finals))}
        rho = 1 - 6 * sum((i - rank[v]) ** 2 for i, v in enumerate(finals)) / (n * (n * n - 1))
        assert d["spearman_sunk_vs_final"] == pytest.approx(rho, abs=1e-12)
    # The base keeps every save the plan grows from.
    for s in r["per_seed"]:
        for it in s["save_iterations"]:
            assert (repro["dir"] / f"seed_{s['seed']}" / "runs" / "base" / f"iter_{it:07d}").is_dir()


def test_statistics_over_seeds_from_their_definitions(repro):
    r = repro["r"]
    rows = {row["quantity"]: row for row in r["aggregate"]["findings"]}
    seeds = r["per_seed"]

    def check(quantity, values, expected_side):
        row = rows[quantity]
        n = len(values)
        mean = sum(values) / n
        se = statistics.stdev(values) / math.sqrt(n)
        assert row["values"] == pytest.approx(values) and row["mean"] == pytest.approx(mean)
        assert row["se"] == pytest.approx(se) and row["n"] == n == 2
        half = T975[n - 1] * se
        assert row["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-6)
        lo, hi = mean - half, mean + half
        clear = hi < 0 if expected_side == "negative" else lo > 0
        wrong = lo > 0 if expected_side == "negative" else hi < 0
        assert (row["verdict"] == "reproduced") == clear and (row["verdict"] == "contradicted") == wrong

    depth = "depth interposition x2"
    check(f"final loss, grown - scratch ({depth})",
          [s["runs"][f"interposition_at_{s['save_iterations'][-1]}"]["final_loss"]
           - s["runs"]["scratch_depth"]["final_loss"] for s in seeds], "negative")
    check("final loss, alpha 0.01 - alpha 0",
          [s["runs"]["width_alpha_0.01"]["final_loss"] - s["runs"]["width_alpha_0"]["final_loss"] for s in seeds],
          "negative")
    late = [s["runs"][f"interposition_at_{s['save_iterations'][-1]}"]["final_loss"]
            - s["runs"][f"stack_at_{s['save_iterations'][-1]}"]["final_loss"] for s in seeds]
    late_fc = seeds[0]["findings"]["b_interposition_vs_stack"][1]["sunk_over_fc"]
    check(f"final loss, interposition - stack, grown at {late_fc:.2f} F_c", late, "negative")
    # Downstream: finding (a)'s final checkpoints were scored by lm-eval on the cloze task.
    accs = [(s["runs"][f"interposition_at_{s['save_iterations'][-1]}"]["downstream"],
             s["runs"]["scratch_depth"]["downstream"]) for s in seeds]
    for grown, scratch in accs:
        for score in (grown, scratch):
            assert score["task"] == "kjv_cloze" and score["samples"] == r["downstream"]["limit"]
            assert 0.0 <= score["acc"] <= 1.0 and score["acc"] * score["samples"] == pytest.approx(
                round(score["acc"] * score["samples"]))  # a count of right answers
    check(f"cloze accuracy, grown - scratch ({depth})", [g["acc"] - s["acc"] for g, s in accs], "positive")
    assert seeds[0]["runs"]["width_alpha_0"]["downstream"] is None  # only (a) is scored at --tiny


def test_markdown_plots_and_report_only(repro):
    r, workdir = repro["r"], repro["dir"]
    with open(workdir / "results.md") as f:
        md = f.read()
    for header in ("## The findings over 2 seeds", "## (a) Grown vs scratch", "## (b) Interposition vs stack",
                   "## (c) Width growth", "## (d) Final loss vs sunk cost"):
        assert header in md
    assert len(r["plots"]) == 4
    for path in r["plots"]:
        assert os.path.dirname(path) == str(workdir)
        with open(path, "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path
    os.remove(workdir / "results.md")
    assert main(["repro", "--tiny", "--workdir", str(workdir), "--ranks", "2", "--report-only"]) == 0
    with open(workdir / "results.md") as f:
        assert f.read() == md
