"""``route-stats``: per-layer routing counts of a real checkpoint on real tokens, in any layout.

A tiny MoE (4 layers, 4 experts, top-2, vocabulary 512) is saved once, then its routing is counted
on the first 2048 tokens of the KJV dataset (the session's sentencepiece-512 tokenization) in three
layouts: one rank, TP=2 (tokens split by sequence parallelism) and EP=2 (data-parallel ranks split the
sequences). By definition every layer routes every token to exactly k=2 experts, so each layer's
counts sum to 2 x 2048 in every layout; the layouts route the same tokens with the same weights, so
the shares agree (up to routing flips of near-tied scores, whose reduction order differs across TP).
The written file is the one ``growth.upcycle.utility_stats`` reads; the last test runs the whole path
(train, route-stats in EP=2, ``train --grow-from`` with upcycling by that file, lineage checked).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/distributed/test_route_stats.py
"""

from __future__ import annotations

import json

import pytest

from megatron_grow.config.route_stats import FORMAT
from megatron_grow.config.schema import GrowthConfig, ParallelConfig, UpcycleGrowthConfig
from megatron_grow.growth.plan import make_growth_plan
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.bodies import build_save_forward, tiny_model

pytestmark = pytest.mark.slow  # ~2 min on 2 shared cores: one save, three counting runs, two short trainings

MODEL = tiny_model(vocab_size=512, moe_router_enable_expert_bias=True)
EP2 = ParallelConfig(expert_model_parallel_size=2)
TOKENS = 2048


def count_body(root: str, prefix: str, parallel: ParallelConfig, out: str):
    from megatron_grow.growth.route_stats import route_stats, write_stats

    stats = route_stats(root, prefix, parallel, tokens=TOKENS, micro_batch=2)
    write_stats(out, stats)
    return stats


@pytest.fixture(scope="module")
def counted(kjv_dataset, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("route_stats") / "ckpt")
    run_in_processes(build_save_forward, 1, (MODEL, ParallelConfig(), root))
    out = {}
    for name, world, parallel in (("one_rank", 1, ParallelConfig()),
                                  ("tp2", 2, ParallelConfig(tensor_model_parallel_size=2)),
                                  ("ep2", 2, ParallelConfig(expert_model_parallel_size=2))):
        path = str(tmp_path_factory.mktemp(name) / "stats.json")
        results = run_in_processes(count_body, world, (root, kjv_dataset["prefix"], parallel, path))
        assert all(r == results[0] for r in results), f"{name}: ranks disagree"
        with open(path) as f:
            out[name] = (json.load(f), path)
    return out


def test_every_token_is_routed_k_times_in_every_layout(counted):
    for name, (stats, _) in counted.items():
        assert stats["format"] == FORMAT and stats["tokens"] == TOKENS, name
        assert len(stats["counts"]) == MODEL.num_layers and len(stats["counts"][0]) == MODEL.num_moe_experts
        for layer, row in enumerate(stats["counts"]):
            assert sum(row) == TOKENS * MODEL.moe_router_topk, (name, layer, row)
            assert sum(stats["shares"][layer]) == pytest.approx(1.0)


def test_layouts_agree(counted):
    base = counted["one_rank"][0]["counts"]
    for name in ("tp2", "ep2"):
        for layer, (a, b) in enumerate(zip(base, counted[name][0]["counts"])):
            # identical weights and tokens; only near-tied scores may flip under another reduction order
            assert max(abs(x - y) for x, y in zip(a, b)) <= 0.01 * TOKENS, (name, layer, a, b)


def test_the_file_drives_the_upcycle_allocation(counted):
    stats, path = counted["ep2"]
    plan = make_growth_plan(MODEL, GrowthConfig(upcycle=UpcycleGrowthConfig(num_experts=5, utility_stats=path)))
    # one new expert per layer: it goes to that layer's expert with the largest share (largest remainder
    # of 1 * share), each layer by its own row of the file
    for layer, row in enumerate(stats["shares"]):
        assert plan.expert_source[layer][4] == max(range(4), key=lambda e: (row[e], -e)), layer
    assert plan.growth.upcycle.utility_shares == tuple(tuple(row) for row in stats["shares"])


def test_train_grow_from_upcycles_by_measured_utility(kjv_dataset, tmp_path):
    """The whole path: train a tiny base, measure its routing in EP=2, then ``train --grow-from`` with
    ``growth.upcycle.utility_stats`` in EP=2; the lineage names the utility it used and the file's digest."""
    from megatron_grow.checkpoint import io, paths
    from megatron_grow.config.route_stats import file_sha256
    from tests.distributed.bodies import train_body
    from tests.distributed.conftest import write_recipe

    base = write_recipe(tmp_path / "base.yaml", kjv_dataset, tmp_path / "base", training={"train_iters": 2})
    run_in_processes(train_body, 1, (base, []))
    stats = str(tmp_path / "stats.json")
    run_in_processes(count_body, 2, (str(tmp_path / "base"), kjv_dataset["prefix"], EP2, stats))
    grow = write_recipe(tmp_path / "grow.yaml", kjv_dataset, tmp_path / "grown", training={"train_iters": 3},
                        parallel={"expert_model_parallel_size": 2})
    with open(grow, "a") as f:
        f.write(f"growth:\n  upcycle: {{num_experts: 10, utility_stats: {stats}, bias_noise: 0.001}}\n")
    out = run_in_processes(train_body, 2, (grow, [], str(tmp_path / "base")))[0]
    assert out["exit_code"] == 0 and out["iteration"] == 3
    manifest = io.read_manifest(paths.iteration_dir(str(tmp_path / "grown"), 3))
    assert manifest["model"]["num_moe_experts"] == 10 and manifest["model"]["moe_router_topk"] == 2
    record = manifest["lineage"][-1]["upcycle"]
    with open(stats) as f:
        shares = json.load(f)["shares"]
    assert record["utility_stats"] == stats and record["utility_stats_sha256"] == file_sha256(stats)
    assert [list(row) for row in record["utility_shares"]] == shares  # the per-layer shares, as measured


@pytest.mark.parametrize("case, expect", [
    ("tokens_zero", "--tokens: 0 is not allowed"),
    ("missing_data", "missing"),
    ("missing_checkpoint", "nope"),
])
def test_bad_input_is_one_line_and_exit_2(counted, kjv_dataset, tmp_path, case, expect):
    import contextlib
    import io as _io

    from megatron_grow.__main__ import main

    ckpt = counted["one_rank"][0]["checkpoint"]
    argv = {"tokens_zero": ["--load", ckpt, "--data", kjv_dataset["prefix"], "--tokens", "0"],
            "missing_data": ["--load", ckpt, "--data", str(tmp_path / "none")],
            "missing_checkpoint": ["--load", str(tmp_path / "nope"), "--data", kjv_dataset["prefix"]]}[case]
    err = _io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io.StringIO()):
        code = main(["route-stats", *argv, "--out", str(tmp_path / "s.json")])
    assert code == 2, err.getvalue()
    assert expect in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    assert not (tmp_path / "s.json").exists()
