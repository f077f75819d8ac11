"""``inspect``, ``weight-norms``, ``flops`` and ``advise`` on real tiny checkpoints (CPU, one gloo process).

One spawned process builds a tiny MoE whose expert and attention weights are scaled by
``1 + layer`` (a monotone weight-norm profile, like a converged model's), saves it as a run of
six checkpoints with WSD-schedule counters, and grows iteration 200 by depth interposition and
by stack (``configs/growth/tiny_depth.yaml``). The tools then run in this process, reading the
checkpoints without building a model or initialising torch.distributed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from megatron_grow.__main__ import main
from megatron_grow.analysis.weight_norms import save_profile_record
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.parallel.spawn import run_in_processes
from megatron_grow.training.flops import training_flops_per_token
from tests.distributed.bodies import tiny_model

ROOT = Path(__file__).resolve().parents[2]
DEPTH_RECIPE = str(ROOT / "configs" / "growth" / "tiny_depth.yaml")
MODEL = tiny_model()  # 4 layers, H 64, 4 heads (2 groups, head dim 16), 4 experts top-2, F 32, V 256, s 32
RUN_ITERATIONS = (50, 100, 150, 200, 250, 300)
GLOBAL_BATCH = 512  # sequences per step: 512 x 32 = 16,384 tokens per step
TRAIN_ITERS, WSD_DECAY_ITERS, WARMUP_ITERS = 300, 100, 10  # WSD: decay after iteration 200
GROW_FROM = 200


def _scale_layers(gpt) -> dict:
    """Scale every expert and attention matrix of layer l by (1 + l); return the expected profile."""
    experts: dict[int, list] = {}
    attention: dict[int, list] = {}
    fc1: dict[tuple, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            m = re.match(r"decoder\.layers\.(\d+)\.", name)
            if not m:
                continue
            layer = int(m.group(1))
            rms = lambda t: math.sqrt(float(t.double().square().sum()) / t.numel())
            if ".mlp.experts." in name and name.endswith("linear_fc1.weight"):
                p.mul_(1 + layer)
                f = p.shape[0] // 2
                experts.setdefault(layer, []).extend([rms(p[:f]), rms(p[f:])])  # gate, up
                fc1[(layer, int(re.search(r"local_experts\.(\d+)\.", name).group(1)))] = p.detach().clone()
            elif ".mlp.experts." in name and name.endswith("linear_fc2.weight"):
                p.mul_(1 + layer)
                experts.setdefault(layer, []).append(rms(p))  # down
            elif name.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight")):
                p.mul_(1 + layer)
                attention.setdefault(layer, []).append(rms(p))
    layers = sorted(experts)
    stacked = torch.stack([torch.stack([fc1[(i, e)] for e in range(MODEL.num_moe_experts)]) for i in layers])
    return {"experts": [sum(experts[i]) / len(experts[i]) for i in layers],
            "attention": [sum(attention[i]) / len(attention[i]) for i in layers], "fc1": stacked}


def make_checkpoints(base: str) -> dict:
    """(spawned) a run of six checkpoints, then interposition and stack growths of iteration 200."""
    from megatron_grow.checkpoint import io
    from megatron_grow.checkpoint.manifest import build_manifest
    from megatron_grow.config.loader import recipe_to_dict
    from megatron_grow.config.schema import Recipe, TrainingConfig
    from megatron_grow.growth.grow import grow_checkpoint
    from megatron_grow.models.builder import build_gpt_model
    from megatron_grow.parallel.init import initialize_distributed

    parallel = ParallelConfig()
    initialize_distributed(parallel, seed=1234)
    gpt = build_gpt_model(MODEL, parallel)
    expected = _scale_layers(gpt)
    recipe = recipe_to_dict(Recipe(model=MODEL, training=TrainingConfig(
        global_batch_size=GLOBAL_BATCH, train_iters=TRAIN_ITERS, lr_decay_style="WSD",
        lr_wsd_decay_iters=WSD_DECAY_ITERS, lr_warmup_iters=WARMUP_ITERS)))
    fpt = training_flops_per_token(MODEL).total
    run = os.path.join(base, "run")
    for it in RUN_ITERATIONS:
        tokens = it * GLOBAL_BATCH * MODEL.seq_length
        # Iteration 50 records no FLOPs counter: the tools must estimate it from the tokens.
        counters = {"iteration": it, "consumed_samples": it * GLOBAL_BATCH, "consumed_tokens": tokens,
                    "flops_so_far": 0 if it == 50 else tokens * fpt, "sunk_flops": 0}
        manifest = build_manifest(model=MODEL, layout={"tp": 1, "pp": 1, "ep": 1, "etp": 1, "dp": 1, "world_size": 1},
                                  counters=counters, lineage=[], recipe=recipe)
        io.save_checkpoint(run, it, io.model_sharded_state_dict([gpt]), manifest)
    growth = load_recipe(DEPTH_RECIPE).growth
    src = os.path.join(run, f"iter_{GROW_FROM:07d}")
    for mode in ("interposition", "stack"):
        g = dataclasses.replace(growth, depth=dataclasses.replace(growth.depth, mode=mode))
        grow_checkpoint(src, os.path.join(base, mode), g, parallel, progress=False)
    return expected


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("tools"))
    expected = run_in_processes(make_checkpoints, 1, (base,), timeout=240)[0]
    return {"base": base, "run": os.path.join(base, "run"), "src": os.path.join(base, "run", f"iter_{GROW_FROM:07d}"),
            "interposition": os.path.join(base, "interposition"), "stack": os.path.join(base, "stack"),
            "expected": expected}


def cli_json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------------
# Hand arithmetic for the tiny model (no library calls).

H, Q, G, E, K, F, V, S, L = 64, 4 * 16, 2 * 16, 4, 2, 32, 256, 32, 4
LAYER_NON_EXPERT = 2 * H + 2 * 16 + H * (Q + 2 * G) + Q * H + E * H  # norms, qk-norms, qkv, proj, router
EXPERT = H * 2 * F + F * H


def activated(layers: int) -> int:
    return 2 * V * H + H + layers * (LAYER_NON_EXPERT + K * EXPERT)


def flops_per_token(layers: int) -> int:
    per_layer = 2 * H * (Q + 2 * G) + 2 * Q * H + 4 * S * Q + 2 * H * E + K * 3 * 2 * H * F
    return 3 * (layers * per_layer + 2 * H * V)


def test_hand_arithmetic_is_the_tiny_model():
    assert activated(4) == 132_800
    assert flops_per_token(4) == training_flops_per_token(MODEL).total == 792_576


# ------------------------------------------------------------------------------------------------
# inspect


@pytest.mark.slow
def test_inspect_shows_lineage_counters_and_layout(ckpts, capsys):
    rep = cli_json(capsys, "inspect", ckpts["interposition"])
    assert rep["iteration"] == GROW_FROM and rep["model"]["num_layers"] == 8
    tokens = GROW_FROM * GLOBAL_BATCH * S
    c = rep["counters"]
    assert c["iteration"] == GROW_FROM and c["consumed_tokens"] == tokens
    assert c["flops_so_far"] == tokens * flops_per_token(4) == c["sunk_flops"]
    assert len(rep["lineage"]) == 1
    rec = rep["lineage"][0]
    assert rec["operators"] == ["depth"] and rec["depth"]["mode"] == "interposition" and rec["depth"]["factor"] == 2
    assert rec["source_iteration"] == GROW_FROM and rec["source_path"] == ckpts["src"]
    assert rec["params_after"] - rec["params_before"] == 4 * (LAYER_NON_EXPERT + E * EXPERT)
    assert rep["layout"]["world_size"] == 1 and rep["saved_by"]["writer_ranks"] == 1
    shapes = {t["key"]: t["shape"] for t in rep["tensors"]}
    assert shapes["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == [8, E, 2 * F, H]
    assert rep["total_bytes"] > rep["tensor_bytes"] > 0

    assert main(["inspect", ckpts["stack"]]) == 0
    text = capsys.readouterr().out
    assert "depth stack x2" in text and f"@ iteration {GROW_FROM}" in text and "lineage      1 growth(s)" in text


@pytest.mark.slow
def test_inspect_stats_match_the_saved_weights(ckpts, capsys):
    rep = cli_json(capsys, "inspect", ckpts["src"], "--stats", "--max-mib", "0.01")  # forces many small reads
    row = next(t for t in rep["tensors"] if t["key"] == "decoder.layers.mlp.experts.experts.linear_fc1.weight")
    w = ckpts["expected"]["fc1"].double()
    assert row["mean"] == pytest.approx(float(w.mean()), rel=1e-9, abs=1e-12)
    assert row["std"] == pytest.approx(float(w.std(unbiased=False)), rel=1e-9)
    assert row["absmax"] == pytest.approx(float(w.abs().max()), rel=1e-12)
    assert row["chunks"] == L * E * 2  # gate and up are stored as separate chunks: regions span chunks


# ------------------------------------------------------------------------------------------------
# weight-norms


@pytest.mark.slow
def test_weight_norms_cliff_for_stack_smooth_for_interposition(ckpts, capsys, tmp_path):
    png = str(tmp_path / "norms.png")
    rep = cli_json(capsys, "weight-norms", ckpts["src"], "--compare", ckpts["interposition"], ckpts["stack"],
                   "--plot", png, "--quiet")
    src, interp, stack = rep["profiles"]
    exp = ckpts["expected"]
    assert src["experts"] == pytest.approx(exp["experts"], rel=1e-9)
    assert src["attention"] == pytest.approx(exp["attention"], rel=1e-9)
    assert all(b > a for a, b in zip(src["experts"], src["experts"][1:]))  # monotone source
    # Interposition: l0 l0 l1 l1 ...: exact pairs, never decreasing.
    assert interp["experts"] == [v for v in src["experts"] for _ in range(2)]
    assert all(b >= a for a, b in zip(interp["experts"], interp["experts"][1:]))
    assert interp["experts_jump"]["layer"] is None and interp["seams"] == []
    # Stack: l0..l3 l0..l3: one drop, at the seam between layers 3 and 4, far larger than a typical step.
    assert stack["experts"] == src["experts"] * 2 and stack["attention"] == src["attention"] * 2
    drops = [i for i, (a, b) in enumerate(zip(stack["experts"], stack["experts"][1:])) if b < a]
    assert drops == [3] and stack["seams"] == [4]
    assert stack["experts_jump"]["layer"] == 3 and stack["experts_jump"]["ratio"] > 2
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000
    assert [p["name"] for p in rep["profiles"]] == ["run@200", "interposition", "stack"]


@pytest.mark.slow
def test_weight_norms_text_table(ckpts, capsys):
    assert main(["weight-norms", ckpts["stack"], "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "largest drop" in out and "between layers 3 and 4" in out and "stack seam(s) at layer(s) [4]" in out


# ------------------------------------------------------------------------------------------------
# flops


@pytest.mark.slow
def test_flops_matches_hand_arithmetic(ckpts, capsys):
    extra = 5_000_000
    rep = cli_json(capsys, "flops", ckpts["src"], "--grow-recipe", DEPTH_RECIPE, "--extra-tokens", "5e6")
    tokens = GROW_FROM * GLOBAL_BATCH * S
    sunk = tokens * flops_per_token(4)
    fc = 6 * activated(4) * 20 * activated(4)
    s = rep["sunk"]
    assert not s["estimated"] and s["flops"] == sunk and s["tokens"] == tokens
    assert s["activated_params"] == activated(4) and s["chinchilla_flops"] == fc
    assert s["fc_ratio"] == pytest.approx(sunk / fc, rel=1e-12)
    assert s["fc_ratio"] > 1 and rep["advice"]["mode"] == "interposition"
    assert rep["advice"]["min_continued_flops"] == sunk
    g = rep["growth"]
    assert g["target"]["layers"] == 8 and g["activated_params"] == activated(8)
    assert g["flops_per_token"] == flops_per_token(8)
    assert g["chinchilla_flops"] == 120 * activated(8) ** 2
    assert g["min_continued_tokens"] == pytest.approx(sunk / flops_per_token(8))
    b = g["budget"]
    assert b["extra_flops"] == extra * flops_per_token(8)
    assert b["grown_total_flops"] == sunk + extra * flops_per_token(8)
    assert b["scratch_same_extra"]["tokens"] == extra
    assert b["scratch_same_total"]["tokens"] == pytest.approx((sunk + extra * flops_per_token(8)) / flops_per_token(8))
    assert b["meets_rule_of_thumb"] == (extra * flops_per_token(8) >= sunk)

    assert main(["flops", ckpts["src"], "--grow-recipe", DEPTH_RECIPE, "--extra-tokens", "5e6"]) == 0
    text = capsys.readouterr().out
    assert f"{fc:.6g}" in text and "recorded counter" in text and f"{flops_per_token(8):.6g}" in text


@pytest.mark.slow
def test_flops_estimates_when_no_counter(ckpts, capsys):
    rep = cli_json(capsys, "flops", os.path.join(ckpts["run"], "iter_0000050"))
    tokens = 50 * GLOBAL_BATCH * S
    assert rep["sunk"]["estimated"] and rep["sunk"]["flops"] == tokens * flops_per_token(4)
    assert rep["sunk"]["fc_ratio"] < 1 and "< 1x" in rep["advice"]["why"]  # 50 steps: 0.31x F_c
    assert main(["flops", os.path.join(ckpts["run"], "iter_0000050")]) == 0
    assert "estimated" in capsys.readouterr().out


@pytest.mark.slow
def test_flops_of_grown_checkpoint_uses_grown_architecture(ckpts, capsys):
    rep = cli_json(capsys, "flops", ckpts["stack"])
    assert rep["sunk"]["activated_params"] == activated(8)
    assert rep["sunk"]["growths"] == 1 and rep["recorded_sunk_before_latest_growth"] == rep["sunk"]["flops"]


# ------------------------------------------------------------------------------------------------
# advise


@pytest.mark.slow
def test_advise_picks_latest_constant_lr_checkpoint_past_one_fc(ckpts, capsys):
    rep = cli_json(capsys, "advise", ckpts["run"])
    rows = {r["iteration"]: r for r in rep["rows"]}
    assert sorted(rows) == list(RUN_ITERATIONS)
    fc = 120 * activated(4) ** 2
    for it, r in rows.items():
        assert r["tokens"] == it * GLOBAL_BATCH * S
        assert r["sunk_flops"] == it * GLOBAL_BATCH * S * flops_per_token(4)
        assert r["fc_ratio"] == pytest.approx(r["sunk_flops"] / fc)
        assert r["estimated"] == (it == 50)
    assert [rows[i]["phase"] for i in RUN_ITERATIONS] == ["stable"] * 4 + ["decay"] * 2
    assert rows[150]["fc_ratio"] < 1 < rows[200]["fc_ratio"]  # F_c is crossed between 150 and 200
    rec = rep["recommendation"]
    assert rec["iteration"] == 200 and rec["mode"] == "interposition" and rec["phase"] == "stable"
    assert rec["min_continued_flops"] == rows[200]["sunk_flops"]
    assert main(["advise", ckpts["run"]]) == 0
    text = capsys.readouterr().out
    assert "grow iteration 200" in text and "starts after iteration 200" in text


# ------------------------------------------------------------------------------------------------
# errors: one line, exit 2


@pytest.mark.parametrize("argv", [
    ["inspect", "{missing}"],
    ["weight-norms", "{missing}"],
    ["flops", "{missing}"],
    ["advise", "{missing}"],
    ["advise", "{empty}"],
    ["inspect", "{empty}"],
])
def test_bad_paths_are_one_line_errors(argv, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [a.format(missing=str(tmp_path / "nope"), empty=str(empty)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megatron-grow: error: ")


@pytest.mark.slow
def test_truncated_shard_is_a_clear_error(ckpts, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpts["src"], bad / "iter_0000200")
    (bad / "latest_checkpointed_iteration.txt").write_text("200\n")
    shard = next(p for p in (bad / "iter_0000200").iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(["weight-norms", str(bad), "--quiet"]) == 2
    assert "truncated" in capsys.readouterr().err


@pytest.mark.slow
def test_save_profile_record_predicts_the_grown_checkpoints(ckpts, capsys):
    record = save_profile_record(ckpts["src"])
    assert json.loads(json.dumps(record, allow_nan=False)) == record == save_profile_record(ckpts["src"])
    exp = ckpts["expected"]
    assert record["iteration"] == GROW_FROM and record["num_layers"] == 4
    assert record["experts"] == pytest.approx(exp["experts"], rel=1e-9)
    assert record["rise_first_to_last"]["experts"] == pytest.approx(exp["experts"][-1] - exp["experts"][0], rel=1e-9)
    # The drops predicted from the base's profile are those measured on the real grown checkpoints (which
    # copy layers exactly: zero noise, so equal to the bit).
    rep = cli_json(capsys, "weight-norms", ckpts["interposition"], "--compare", ckpts["stack"], "--quiet")
    interp, stack = rep["profiles"]
    for name in ("experts", "attention"):
        assert record["depth_x2"]["stack"][name] == stack[f"{name}_jump"]
        assert record["depth_x2"]["interposition"][name] == interp[f"{name}_jump"]
    assert record["depth_x2"]["stack"]["experts"]["layer"] == 3
