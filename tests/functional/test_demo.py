"""The demo end to end in its reduced mode (CPU, 2 gloo ranks, about a minute).

Runs ``megatron-grow demo --reduced`` exactly as a user would (the CLI entry, real data,
trainer, offline growth and verification in spawned processes) and checks its outputs:
falling base losses, a verified grown checkpoint, equal additional FLOPs for grown and
scratch, the same validation tokens for every phase, the table in the JSON and a real PNG.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from megatron_grow.__main__ import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    code = main(["demo", "--reduced", "--workdir", str(workdir), "--ranks", "2"])
    seconds = time.perf_counter() - t0
    with open(workdir / "results.json") as f:
        results = json.load(f)
    return {"code": code, "dir": workdir, "results": results, "seconds": seconds}


def test_demo_exits_cleanly(demo_run):
    assert demo_run["code"] == 0
    print(f"reduced demo: {demo_run['seconds']:.0f}s")  # timing is reported, never asserted (benchmarks/)


def test_base_loss_is_finite_and_falls(demo_run):
    r = demo_run["results"]
    curve = r["curves"]["base"]
    losses = [loss for _, loss in curve]
    assert all(math.isfinite(x) for x in losses)
    assert len(losses) >= 3  # the start evaluation and at least two during training
    assert losses[0] > losses[-1] + 0.5, losses           # from ~ln(512) = 6.24 to well below
    assert abs(losses[0] - math.log(512)) < 0.3, losses[0]  # random init predicts ~uniformly
    train = [loss for _, loss in r["train_losses"]["base"]]
    assert all(math.isfinite(x) for x in train)
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5
    flops = [f for f, _ in curve]
    assert flops == sorted(flops) and flops[0] == 0.0


def test_grown_checkpoint_verified(demo_run):
    r = demo_run["results"]
    v = r["growth"]["verify"]
    assert 0.3 <= v["routing_share_copies"] <= 0.7, v
    # Interposition applies each residual update twice, so the grown model is not the base (KL > 0),
    # but it keeps most of it (measured: 0.054 nats/token in the reduced demo, 0.78 in the full one).
    assert 0.0 < v["kl_mean"] < 1.0, v
    assert v["kl_mean"] <= v["kl_max"], v
    assert r["models"]["base"]["layers"] * 2 == r["models"]["grown"]["layers"]
    assert r["models"]["base"]["experts"] * 2 == r["models"]["grown"]["experts"]
    assert r["models"]["base"]["topk"] * 2 == r["models"]["grown"]["topk"]
    # The offline growth output is a real checkpoint that records its lineage.
    from megatron_grow.checkpoint import paths
    from megatron_grow.checkpoint.manifest import read_checkpoint_info

    ckpt_dir, iteration = paths.resolve_checkpoint_dir(r["checkpoints"]["grown_init"])
    info = read_checkpoint_info(ckpt_dir, iteration)
    assert iteration == r["size"]["base_iters"]
    assert info.model.num_layers == r["models"]["grown"]["layers"]
    assert info.lineage and info.lineage[-1]["operators"] == ["depth", "width"]
    assert info.counters["sunk_flops"] == r["sunk_flops"]


def test_equal_additional_flops(demo_run):
    r = demo_run["results"]
    c = r["counters"]
    assert c["grown"]["sunk_flops"] == c["base"]["flops_so_far"] == r["sunk_flops"] > 0
    grown_extra = c["grown"]["flops_so_far"] - c["grown"]["sunk_flops"]
    scratch_extra = c["scratch"]["flops_so_far"] - c["scratch"]["sunk_flops"]
    assert grown_extra == pytest.approx(scratch_extra, rel=1e-12) and grown_extra > 0
    assert c["grown"]["iteration"] - c["base"]["iteration"] == c["scratch"]["iteration"]
    # The grown curve starts at the sunk FLOPs; scratch at zero.
    assert r["curves"]["grown"][0][0] == r["sunk_flops"]
    assert r["curves"]["scratch"][0][0] == 0.0


def test_every_phase_evaluated_on_the_same_tokens(demo_run):
    r = demo_run["results"]
    v = r["validation"]
    assert set(v["per_run"]) == {"base", "grown", "scratch"} and len(v["tokens_sha256"]) == 64
    assert set(v["per_run"].values()) == {v["tokens_sha256"]}, v
    assert v["samples"] == r["size"]["eval_iters"] * r["size"]["global_batch_size"]
    # The three phases end at different iterations (train_iters used to change their validation samples).
    assert len({r["counters"][n]["iteration"] for n in ("base", "grown", "scratch")}) == 3


def test_table_and_json(demo_run):
    r = demo_run["results"]
    rows = r["equal_additional_flops"]
    assert rows[0]["additional_flops"] == 0.0 and rows[-1]["additional_flops"] == r["additional_flops"]
    for row in rows:
        assert math.isfinite(row["grown"]) and row["scratch"] is not None and math.isfinite(row["scratch"])
    final = r["final"]
    assert final["grown_minus_scratch"] == pytest.approx(final["grown"] - final["scratch"])
    for name in ("base", "grown", "scratch"):
        assert name in r["table"]
    with open(demo_run["dir"] / "table.txt") as f:
        assert f.read().strip() == r["table"].strip()


def test_plot_written(demo_run):
    path = demo_run["results"]["plot"]
    assert os.path.dirname(path) == str(demo_run["dir"])
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
