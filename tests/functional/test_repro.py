"""The study end to end at --tiny scale (CPU, 2 gloo ranks per seed, 2 seeds).

Runs ``megatron-grow repro --tiny`` as a user would (the CLI entry, real data, trainer, offline
growth, route-stats, lm-eval scoring on the held-out task) and checks the machinery, not the
science (the tiny base is far below 1x F_c; docs/results.md reads the real run): finite losses,
equal additional FLOPs inside every comparison, sunk costs that match the base's saves, the
continued base resuming the save it names, function-preserving width growth with top-k >= 2, the
same validation tokens for every run of every seed, per-question downstream outcomes, the base's
weight-norm profiles, statistics over seeds recomputed here from their definitions, the raw records
and ``--report-only`` rebuilding the report and plots byte for byte from them.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import pytest

from megatron_grow.__main__ import main
from megatron_grow.experiments import repro as repro_mod

# Two-sided 95 % Student t quantiles t(0.975, dof) from the standard table.
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305}


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("repro")
    t0 = time.perf_counter()
    code = main(["repro", "--tiny", "--workdir", str(workdir), "--ranks", "2"])
    seconds = time.perf_counter() - t0
    with open(workdir / "results.md", encoding="utf-8") as f:
        md = f.read()
    raw = {name: json.loads((workdir / "raw" / name).read_text()) for name in os.listdir(workdir / "raw")}
    # The summary the report was written from, rebuilt from the raw records (what --report-only does).
    summary = repro_mod.run_repro(str(workdir), report_only=True, report_dir=str(workdir / "again"))
    return {"code": code, "dir": workdir, "r": summary, "raw": raw, "md": md, "seconds": seconds}


def test_exits_cleanly_and_writes_raw_records(repro):
    assert repro["code"] == 0
    print(f"repro --tiny: {repro['seconds']:.0f}s")  # timing is reported, never asserted (benchmarks/)
    r, raw = repro["r"], repro["raw"]
    assert set(raw) == {"study.json", "seed_1234.json", "seed_1235.json"}
    study = raw["study.json"]
    assert study["complete"] and study["seeds"] == [1234, 1235] == r["seeds"] and study["ranks"] == 2
    assert study["downstream"]["task"] == "kjv_heldout_cloze" and study["heldout"]["heldout_chapters"] > 0
    for seed in (1234, 1235):
        rec = raw[f"seed_{seed}.json"]
        assert rec["seed"] == seed and set(rec["meta"]) <= set(rec["results"])
        for name, m in rec["meta"].items():  # every run's recipe and seed are in the record
            assert m["recipe"]["training"]["seed"] == seed, name


def _expected_runs(saves: list) -> set:
    first, last = saves[0], saves[-1]
    return ({"base", "scratch_depth", "continue_base", f"stack_at_{first}", f"stack_at_{last}", "width_alpha_0",
             "width_alpha_0.01", "width_topk_fixed", "upcycle_utility", "width_carry", "width_policy",
             "width_rewarmup"} | {f"interposition_at_{it}" for it in saves})


def test_every_loss_finite_and_base_learns(repro):
    for s in repro["r"]["per_seed"]:
        assert set(s["runs"]) == _expected_runs(s["save_iterations"])
        for name, run in s["runs"].items():
            losses = [loss for _, loss in run["curve"]] + [loss for _, loss in run["train_losses"]]
            assert losses and all(math.isfinite(x) for x in losses), name
            assert len(run["curve"]) >= 3, name  # the start evaluation and at least two during training
        base = [loss for _, loss in s["runs"]["base"]["curve"]]
        assert abs(base[0] - math.log(256)) < 0.3, base[0]  # random init predicts ~uniformly (vocabulary 256)
        assert base[0] > base[-1] + 0.5, base
        assert abs(s["runs"]["scratch_depth"]["start_loss"] - math.log(256)) < 0.3


def test_function_preserving_growths_start_at_the_base_loss(repro):
    """Top-k x2 width growth with exact copies and upcycling with unselected copies compute the source's
    function: their first evaluation equals the base's at the save (same weights' function, same tokens);
    the continued base resumes that save itself."""
    for s in repro["r"]["per_seed"]:
        last = s["save_iterations"][-1]
        base_loss = next(ck["valid_loss"] for ck in s["base"]["saves"] if ck["iteration"] == last)
        for name in ("width_alpha_0", "upcycle_utility", "continue_base"):
            assert s["runs"][name]["start_loss"] == pytest.approx(base_loss, abs=1e-5), name
        # Top-k fixed copies take top-k slots: not function-preserving (the loss moves).
        assert abs(s["runs"]["width_topk_fixed"]["start_loss"] - base_loss) > 1e-4


def test_every_run_of_every_seed_evaluated_on_the_same_tokens(repro):
    r = repro["r"]
    digests = {(s["seed"], name): run["valid_tokens_sha256"] for s in r["per_seed"] for name, run in s["runs"].items()}
    assert all(len(d) == 64 for d in digests.values())
    assert set(digests.values()) == {r["validation_tokens_sha256"]}
    # ... although the seeds trained on different data orders: their train losses differ from step 1.
    first = [s["runs"]["base"]["train_losses"][0][1] for s in r["per_seed"]]
    assert first[0] != first[1]


def test_equal_additional_flops_and_sunk_costs(repro):
    r = repro["r"]
    size = r["study"]["size"]
    for s in r["per_seed"]:
        runs, per_step = s["runs"], s["flops_per_base_step"]
        base_c = runs["base"]["counters"]
        assert base_c["iteration"] == size["base_iters"] == s["save_iterations"][-1] and base_c["sunk_flops"] == 0
        assert base_c["flops_so_far"] == pytest.approx(per_step * base_c["iteration"], rel=1e-12)
        for name, run in runs.items():
            if name in ("base", "continue_base"):
                continue
            c = run["counters"]
            assert c["iteration"] - (run["from_iteration"] or 0) == size["grown_iters"], name
            expected_sunk = per_step * (run["from_iteration"] or 0)
            assert run["sunk_flops"] == pytest.approx(expected_sunk, rel=1e-12, abs=0.0), name
            assert run["additional_flops"] == pytest.approx(c["flops_so_far"] - expected_sunk), name
            assert run["curve"][0][0] == 0.0 and run["curve"][-1][0] == pytest.approx(run["additional_flops"]), name
        # The continued base: at least the depth-grown run's budget, less than one evaluation interval more.
        grown = runs[f"interposition_at_{s['save_iterations'][-1]}"]
        extra = runs["continue_base"]["additional_flops"]
        assert grown["additional_flops"] <= extra < grown["additional_flops"] + per_step * size["eval_interval"]
        assert runs["continue_base"]["sunk_flops"] == pytest.approx(per_step * s["save_iterations"][-1], rel=1e-12)
        f = s["findings"]
        groups = [[f["a_grown_vs_scratch"][0]["grown"], f["a_grown_vs_scratch"][0]["other"]],
                  [row["run"] for row in f["c_width_alpha"]["rows"]]
                  + ["width_carry", "width_policy", "width_rewarmup"],
                  ["width_topk_fixed", "upcycle_utility"], [row["run"] for row in f["d_sunk_cost"]["rows"]]]
        groups += [[f"interposition_at_{row['base_iteration']}", f"stack_at_{row['base_iteration']}"]
                   for row in f["b_interposition_vs_stack"]]
        for names in groups:  # same architecture, steps and batch: the same additional FLOPs
            assert len({runs[n]["additional_flops"] for n in names}) == 1, names
            assert len({json.dumps(runs[n]["model"], sort_keys=True) for n in names}) == 1, names


def test_schedules_warmup_and_rewarmup(repro):
    """The recipes in the raw records: warmup then constant for the base and scratch runs; grown runs restart
    with no warmup, except the re-warmup arm."""
    rs = repro["r"]["study"]["repro_size"]
    meta = repro["raw"]["seed_1234.json"]["meta"]
    for name, m in meta.items():
        t = m["recipe"]["training"]
        assert t["lr_decay_style"] == "constant" and t["lr_warmup_iters"] == rs["warmup_iters"] > 0, name
        assert t["lr_rewarmup_iters"] == (rs["rewarmup_iters"] if name == "width_rewarmup" else 0), name
    growth = {name: m["growth"] for name, m in meta.items() if m["growth"]}
    assert growth["width_carry"]["optimizer"] == "carry" and growth["width_policy"]["optimizer"] == "policy"
    assert growth["width_topk_fixed"]["width"]["topk_factor"] == 1
    assert growth["upcycle_utility"]["upcycle"]["allocation"] == "utility"


def test_downstream_and_weight_norms(repro):
    r = repro["r"]
    limit = r["study"]["downstream"]["limit"]
    for s in r["per_seed"]:
        for name in repro_mod.key_runs(s["save_iterations"]):
            score = s["runs"][name]["downstream"]
            items = score["acc_per_question"]
            assert score["task"] == "kjv_heldout_cloze" and score["samples"] == limit == len(items), name
            assert set(items) <= {0.0, 1.0} and score["acc"] == pytest.approx(sum(items) / len(items)), name
        assert s["runs"]["width_carry"]["downstream"] is None  # "key": only the accuracy rows' runs
        profiles = s["base"]["norm_profiles"]
        assert [p["iteration"] for p in profiles] == s["save_iterations"]
        assert all(len(p["experts"]) == r["study"]["size"]["num_layers"] for p in profiles)
        assert all(x > 0 for p in profiles for x in p["experts"])


def test_statistics_over_seeds_from_their_definitions(repro):
    r = repro["r"]
    rows = {row["quantity"]: row for row in r["aggregate"]["findings"]}
    seeds = r["per_seed"]

    def check(quantity, values):
        row = rows[quantity]
        n = len(values)
        mean = sum(values) / n
        se = statistics.stdev(values) / math.sqrt(n)
        assert row["values"] == pytest.approx(values) and row["mean"] == pytest.approx(mean)
        assert row["se"] == pytest.approx(se) and row["n"] == n == 2
        half = T975[n - 1] * se
        assert row["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-6)

    def final(s, name):
        return s["runs"][name]["curve"][-1][1]

    last = [s["save_iterations"][-1] for s in seeds]
    check("final loss, grown - scratch (depth interposition x2)",
          [final(s, f"interposition_at_{it}") - final(s, "scratch_depth") for s, it in zip(seeds, last)])
    check("final loss, alpha 0 - alpha 0.01", [final(s, "width_alpha_0") - final(s, "width_alpha_0.01") for s in seeds])
    check("final loss, Adam moments carried (optimizer: carry) - reference, equal steps",
          [final(s, "width_carry") - final(s, "width_alpha_0.01") for s in seeds])
    accs = [(s["runs"][f"interposition_at_{it}"]["downstream"]["acc"], s["runs"]["scratch_depth"]["downstream"]["acc"])
            for s, it in zip(seeds, last)]
    check("held-out accuracy, grown - scratch (depth interposition x2)", [g - sc for g, sc in accs])
    # Holm across every row: p_(i) adjusted = max_{j <= i} min(1, (m - j + 1) p_(j)) over the sorted p.
    ps = sorted((row["p"], row["quantity"]) for row in r["aggregate"]["findings"] if row["p"] is not None)
    running = 0.0
    for k, (p, quantity) in enumerate(ps):
        running = max(running, min(1.0, (len(ps) - k) * p))
        assert rows[quantity]["p_holm"] == pytest.approx(running), quantity


def test_markdown_plots_and_report_only_byte_for_byte(repro):
    workdir, md = repro["dir"], repro["md"]
    for header in ("## Design", "## Every finding, control and comparison over 2 seeds", "### (d) as an ordering test",
                   "## Every run", "## (b) The base's weight-norm profile at each save", "## Plots"):
        assert header in md
    plots = sorted(os.listdir(workdir / "img"))
    assert len(plots) == 5 and plots == sorted(os.listdir(workdir / "again" / "img"))
    for name in plots:
        data = (workdir / "img" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        assert (workdir / "again" / "img" / name).read_bytes() == data, name
    assert (workdir / "again" / "results.md").read_text(encoding="utf-8") == md
