"""The end-to-end demo: train a small MoE, grow it (depth then width), train on, and compare
with the grown architecture trained from scratch at equal *additional* FLOPs (docs/demo.md).

    megatron-grow demo                       # KJV corpus, sizes for this machine, 2 ranks on CPU
    megatron-grow demo --text my.txt --workdir runs/mine
    megatron-grow demo --reduced             # the CI variant: fewer steps, same phases

Every phase is the production code path, run in fresh processes (``run_in_processes``, gloo on
CPU, NCCL on GPU), with recipes written under ``WORKDIR/recipes/`` that ``megatron-grow train``
accepts unchanged:

1. data: a sentencepiece tokenizer and an indexed dataset (``data/``), skipped when present;
2. base: the source model from random init at a constant LR until its validation loss flattens;
3. grow: ``grow_checkpoint`` (depth interposition k=2, then width m=2 with alpha=0.01, top-k x2)
   into ``WORKDIR/runs/grown_init``, then ``verify_growth`` (logits KL, routing share of the copies);
4. grown: ``Trainer`` resumes the grown checkpoint (recipe ``model:`` = the base, ``growth:`` =
   the operators, as ``megatron-grow train`` resumes after an offline grow), fresh optimizer;
5. scratch: the grown architecture from random init, for the same number of steps with the same
   batch, i.e. the same additional FLOPs (``flops_so_far - sunk_flops`` of the grown run; checked).

Each phase is also evaluated once before its first step (the trainer validates only after
steps), so the curves start where the weights start: random init, or the grown checkpoint.
Every evaluation of every phase reads the same validation tokens (``data.eval_samples``; the
SHA-256 of the token ids is recorded per phase and checked equal).

Outputs in WORKDIR: ``results.json`` (every number), ``loss_vs_flops.png`` and the table that
is printed (``table.txt``). Only the sizes differ between CPU and GPU (``SIZES``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Sequence

import matplotlib

from megatron_grow.config.check import built_model
from megatron_grow.config.loader import load_recipe
from megatron_grow.experiments.common import (
    ExperimentSize,
    base_model_section,
    check_run,
    check_same_validation,
    common_sections,
    default_ranks,
    grow_body,
    interpolate,
    load_average,
    model_summary,
    pick_size,
    prepare_data,
    resolve_texts,
    scratch_model_section,
    spawn,
    train_phase_body,
    training_section,
    write_json,
    write_recipe,
)
from megatron_grow.log import component_log

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

SIZES = {
    # 2 CPU cores, 2 ranks (EP=2), under 5 minutes in all (docs/demo.md has the measured time).
    "cpu": ExperimentSize("cpu", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                          kv_channels=16, num_moe_experts=4, moe_router_topk=1, moe_ffn_hidden_size=64,
                          seq_length=64, micro_batch_size=8, global_batch_size=16, base_iters=400,
                          grown_iters=150, eval_interval=25, eval_iters=4, lr=3e-3),
    # The CI variant: every phase, a few steps each.
    "reduced": ExperimentSize("reduced", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                              kv_channels=16, num_moe_experts=4, moe_router_topk=1, moe_ffn_hidden_size=64,
                              seq_length=64, micro_batch_size=8, global_batch_size=16, base_iters=30,
                              grown_iters=10, eval_interval=10, eval_iters=2, lr=3e-3),
    # One or more GPUs: a larger vocabulary and model, more steps (minutes on one H100).
    "gpu": ExperimentSize("gpu", num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                          kv_channels=32, num_moe_experts=8, moe_router_topk=1, moe_ffn_hidden_size=256,
                          seq_length=256, micro_batch_size=16, global_batch_size=64, base_iters=1500,
                          grown_iters=750, eval_interval=50, eval_iters=8, lr=2e-3, vocab_size=4096),
}

GROWTH = {
    "order": ["depth", "width"],
    "depth": {"mode": "interposition", "factor": 2},
    "width": {"factor": 2, "noise": "gaussian", "alpha": 0.01},
}
PHASES = ("base", "grown_init", "grown", "scratch")


_say = component_log("demo")


def choose_size(size: str, reduced: bool) -> ExperimentSize:
    return pick_size(SIZES, size, "reduced", reduced)


# ------------------------------------------------------------------------------------------------
# Recipes


def build_recipes(workdir: str, size: ExperimentSize, ranks: int, data: dict) -> dict:
    """Write the three training recipes as YAML under WORKDIR/recipes; return their paths."""
    runs = os.path.join(workdir, "runs")
    rdir = os.path.join(workdir, "recipes")
    training = training_section(size)
    common = common_sections(size, ranks, data)

    def ckpt(name, interval):
        d = os.path.join(runs, name)
        return {"save": d, "load": d, "save_interval": interval, "keep_last": 1}

    base = dict(common, model=base_model_section(size),
                training=dict(training, train_iters=size.base_iters),
                checkpoint=ckpt("base", size.base_iters))
    # The grown run: model = the base (the source), growth = the operators, load = the offline
    # grow's output (runs/grown_init, kept for inspection), save = runs/grown; train_iters is
    # absolute, so it continues from the base's iteration.
    grown = dict(common, model=base_model_section(size), growth=GROWTH,
                 training=dict(training, train_iters=size.base_iters + size.grown_iters),
                 checkpoint=dict(ckpt("grown", size.grown_iters), load=os.path.join(runs, "grown_init")))
    grown_recipe, grown_path = write_recipe(rdir, "grown", grown)
    scratch = dict(common, model=scratch_model_section(built_model(grown_recipe)),
                   training=dict(training, train_iters=size.grown_iters),
                   checkpoint=ckpt("scratch", size.grown_iters))
    return {"base": write_recipe(rdir, "base", base)[1], "grown": grown_path,
            "scratch": write_recipe(rdir, "scratch", scratch)[1]}


def grow_then_train_body(source: str, grown: str, recipe_path: str) -> dict:
    """Offline growth, then training from its output, in the same processes (one start-up fewer;
    the trainer re-initialises the model-parallel state as a fresh run would)."""
    grow = grow_body(source, grown, recipe_path)
    out = train_phase_body(recipe_path)
    out["grow"] = grow
    return out


# ------------------------------------------------------------------------------------------------
# Orchestration


def run_demo(workdir: str = "runs/demo", texts: Sequence[str] | None = None, size: str = "auto",
             reduced: bool = False, ranks: int | None = None) -> dict:
    """All five phases; returns the results dict also written to WORKDIR/results.json."""
    t_start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    demo_size = choose_size(size, reduced)
    ranks = ranks or default_ranks(demo_size)
    texts = resolve_texts(texts)
    load = load_average()
    _say(f"size {demo_size.name}, {ranks} rank(s), workdir {workdir}; load average {load}")
    _say("1/5 data: tokenizer and indexed dataset")
    data = prepare_data(workdir, texts, demo_size.vocab_size, say=_say)
    recipes = build_recipes(workdir, demo_size, ranks, data)
    for name in PHASES:  # training starts over; the data is reused
        shutil.rmtree(os.path.join(workdir, "runs", name), ignore_errors=True)
    timings = {"data": data["seconds"]}
    phases = _run_phases(workdir, demo_size, ranks, recipes, timings)
    results = summarize(demo_size, ranks, texts, data, recipes, **phases)
    results["checkpoints"] = {name: os.path.join(workdir, "runs", name) for name in PHASES}
    timings["total"] = time.perf_counter() - t_start
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["load_average_start"], results["load_average_end"] = load, load_average()
    _write_outputs(workdir, results)
    _say(f"total wall time {timings['total']:.1f}s (load average at the end {results['load_average_end']})")
    return results


def _run_phases(workdir: str, size: ExperimentSize, ranks: int, recipes: dict, timings: dict) -> dict:
    """Phases 2-5, each in fresh processes; {base, grow, grown, scratch} results."""
    runs = os.path.join(workdir, "runs")

    def phase(name, fn, args):
        t0 = time.perf_counter()
        out = spawn(fn, ranks, args, timeout=3600.0)
        timings[name] = time.perf_counter() - t0
        _say(f"{name} done in {timings[name]:.1f}s")
        return out

    _say(f"2/5 base: {size.base_iters} steps at a constant LR ({recipes['base']})")
    base = phase("base", train_phase_body, (recipes["base"],))
    check_run("base", base)
    _say("3/5 grow: depth interposition x2, then width x2 (alpha 0.01, top-k x2) with grow_checkpoint, "
         "then verify_growth;")
    _say(f"4/5 grown: then {size.grown_iters} more steps from the grown checkpoint ({recipes['grown']})")
    grown = phase("grow+grown", grow_then_train_body, (os.path.join(runs, "base"),
                                                       os.path.join(runs, "grown_init"), recipes["grown"]))
    grow = grown.pop("grow")
    timings["grow"] = grow["seconds"]
    check_run("grown", grown)
    _say(f"5/5 scratch: the grown architecture from random init, {size.grown_iters} steps ({recipes['scratch']})")
    scratch = phase("scratch", train_phase_body, (recipes["scratch"],))
    check_run("scratch", scratch)
    return {"base": base, "grow": grow, "grown": grown, "scratch": scratch}


def _write_outputs(workdir: str, results: dict) -> None:
    table = format_table(results)
    print(table, flush=True)
    results["table"] = table
    with open(os.path.join(workdir, "table.txt"), "w") as f:
        f.write(table + "\n")
    results["plot"] = write_plot(results, os.path.join(workdir, "loss_vs_flops.png"))
    write_json(os.path.join(workdir, "results.json"), results)
    _say(f"wrote {results['plot']}, {os.path.join(workdir, 'results.json')}, {os.path.join(workdir, 'table.txt')}")


# ------------------------------------------------------------------------------------------------
# Numbers


def _check_flops(base: dict, grown: dict, scratch: dict) -> tuple[float, float]:
    """(sunk FLOPs, additional FLOPs): the grown run's sunk cost is the base's, and grown and scratch
    spent the same additional FLOPs."""
    sunk = grown["counters"]["sunk_flops"]
    if sunk != base["counters"]["flops_so_far"]:
        raise RuntimeError(f"sunk FLOPs of the grown run ({sunk:.4e}) != the base's FLOPs "
                           f"({base['counters']['flops_so_far']:.4e})")
    grown_extra = grown["counters"]["flops_so_far"] - sunk
    scratch_extra = scratch["counters"]["flops_so_far"] - scratch["counters"]["sunk_flops"]
    if not math.isclose(grown_extra, scratch_extra, rel_tol=1e-9):
        raise RuntimeError(f"additional FLOPs differ: grown {grown_extra:.4e}, scratch {scratch_extra:.4e}")
    return sunk, grown_extra


def _curve(run: dict, start_flops: float) -> list:
    """(total FLOPs, validation loss), starting with the evaluation before the first step."""
    pts = [(start_flops, run["start_loss"])] if run["start_loss"] is not None else []
    return pts + [(f, loss) for _, loss, f in run["valid_losses"]]


def _compare(grown_curve: list, scratch_curve: list, sunk: float) -> tuple[list, float | None]:
    """Grown vs scratch at each of the grown run's evaluations, on the additional-FLOPs axis, and the
    additional FLOPs scratch needed to reach the grown model's final loss (None if it did not)."""
    rows = [{"additional_flops": f - sunk, "grown": loss, "scratch": interpolate(scratch_curve, f - sunk)}
            for f, loss in grown_curve]
    reach = next((f for f, loss in scratch_curve if loss <= rows[-1]["grown"]), None)
    return rows, reach


def summarize(size: ExperimentSize, ranks: int, texts, data, recipes, base, grow, grown, scratch) -> dict:
    """Curves on one FLOPs axis, and the grown-vs-scratch comparison at equal additional FLOPs."""
    base_model = load_recipe(recipes["base"]).model
    target = built_model(load_recipe(recipes["grown"]))
    gbs, seq = size.global_batch_size, size.seq_length
    sunk, extra = _check_flops(base, grown, scratch)
    valid_digest = check_same_validation({"base": base, "grown": grown, "scratch": scratch})
    curves = {"base": _curve(base, 0.0), "grown": _curve(grown, sunk), "scratch": _curve(scratch, 0.0)}
    compare, scratch_reach = _compare(curves["grown"], curves["scratch"], sunk)
    end = compare[-1]
    return {
        "size": dataclasses.asdict(size), "ranks": ranks, "texts": texts,
        "dataset": {"prefix": data["prefix"], "tokenizer_model": data["tokenizer_model"], "tokens": data["tokens"]},
        "recipes": recipes,
        "validation": {"samples": size.eval_samples, "tokens_sha256": valid_digest,
                       "per_run": {name: run["valid_tokens_sha256"] for name, run in (("base", base), ("grown", grown),
                                                                                      ("scratch", scratch))}},
        "models": {"base": model_summary(base_model, gbs, seq), "grown": model_summary(target, gbs, seq)},
        "growth": {"operators": GROWTH, "summary": grow["summary"], "verify": grow["verify"]},
        "sunk_flops": sunk,
        "additional_flops": extra,
        "curves": curves,
        "train_losses": {name: run["train_losses"] for name, run in (("base", base), ("grown", grown),
                                                                     ("scratch", scratch))},
        "counters": {"base": base["counters"], "grown": grown["counters"], "scratch": scratch["counters"]},
        "equal_additional_flops": compare,
        "final": {"base": curves["base"][-1][1], "grown": end["grown"], "scratch": end["scratch"],
                  "grown_minus_scratch": end["grown"] - end["scratch"],
                  "scratch_flops_to_reach_grown_final": scratch_reach},
    }


# ------------------------------------------------------------------------------------------------
# Table and plot


def _model_line(label: str, m: dict) -> str:
    return (f"{label:<6}: {m['layers']} layers, {m['experts']} experts, top-{m['topk']}, {m['params']['total']:,} "
            f"params ({m['params']['activated']:,} activated), {m['flops_per_step']:.3e} FLOPs/step")


def format_table(r: dict) -> str:
    lines = [
        "",
        _model_line("base", r["models"]["base"]),
        _model_line("grown", r["models"]["grown"]),
        f"growth check: KL(base || grown) {r['growth']['verify'].get('kl_mean', float('nan')):.3e}, "
        f"routing share of copies {r['growth']['verify']['routing_share_copies']:.3f}",
        "",
        f"validation loss vs FLOPs (every run on the same {r['validation']['samples']} validation samples)",
        f"{'run':<10}{'start FLOPs':>13}{'start loss':>12}{'end FLOPs':>13}{'end loss':>10}",
    ]
    for name in ("base", "grown", "scratch"):
        c = r["curves"][name]
        lines.append(f"{name:<10}{c[0][0]:>13.3e}{c[0][1]:>12.4f}{c[-1][0]:>13.3e}{c[-1][1]:>10.4f}")
    lines += [
        "",
        f"at equal additional FLOPs (sunk cost of the base {r['sunk_flops']:.3e} not counted)",
        f"{'additional FLOPs':>17}{'grown':>10}{'scratch':>10}{'grown-scratch':>15}",
    ]
    for row in r["equal_additional_flops"]:
        s = row["scratch"]
        diff = f"{row['grown'] - s:>+15.4f}" if s is not None else f"{'':>15}"
        lines.append(f"{row['additional_flops']:>17.3e}{row['grown']:>10.4f}"
                     f"{(f'{s:.4f}' if s is not None else '-'):>10}{diff}")
    return "\n".join(lines + _verdict_lines(r))


def _verdict_lines(r: dict) -> list:
    f = r["final"]
    verdict = "beats" if f["grown_minus_scratch"] < 0 else "does NOT beat"
    reach = f["scratch_flops_to_reach_grown_final"]
    return [
        "",
        f"after {r['additional_flops']:.3e} additional FLOPs the grown model {verdict} scratch: "
        f"{f['grown']:.4f} vs {f['scratch']:.4f} ({f['grown_minus_scratch']:+.4f}); the base ended at {f['base']:.4f}",
        (f"scratch reached the grown model's final loss after {reach:.3e} FLOPs" if reach is not None
         else "scratch did not reach the grown model's final loss within the same additional FLOPs"),
    ]


_STYLE = {"base": dict(color="tab:blue"), "grown": dict(color="tab:red"),
          "scratch": dict(color="tab:gray", linestyle="--")}


def _plot_labels(r: dict) -> dict:
    b, g = r["models"]["base"], r["models"]["grown"]
    return {
        "base": f"base ({b['layers']}L, {b['experts']}E, top-{b['topk']})",
        "grown": f"grown ({g['layers']}L, {g['experts']}E, top-{g['topk']}), from the base",
        "scratch": f"scratch ({g['layers']}L, {g['experts']}E, top-{g['topk']}), random init",
    }


def _plot_total(ax, r: dict, labels: dict) -> None:
    sunk = r["sunk_flops"]
    for name in ("base", "grown", "scratch"):
        xs, ys = zip(*r["curves"][name])
        ax.plot(xs, ys, marker=".", label=labels[name], **_STYLE[name])
    ax.axvline(sunk, color="k", linewidth=0.8, linestyle=":")
    ax.annotate("growth (sunk cost)", (sunk, ax.get_ylim()[1]), textcoords="offset points", xytext=(3, -12),
                fontsize=8)
    ax.set_xlabel("total training FLOPs\n(the grown curve starts at the base's sunk FLOPs)")
    ax.set_title("validation loss vs total FLOPs")


def _plot_additional(ax, r: dict, labels: dict) -> None:
    for name in ("grown", "scratch"):
        shift = r["sunk_flops"] if name == "grown" else 0.0
        xs, ys = zip(*[(f - shift, loss) for f, loss in r["curves"][name]])
        ax.plot(xs, ys, marker=".", label=labels[name], **_STYLE[name])
    ax.axhline(r["curves"]["base"][-1][1], color="tab:blue", linewidth=0.8, linestyle=":", label="base, final")
    ax.set_xlabel("additional FLOPs after growth\n(the base's sunk cost not counted)")
    ax.set_title("grown vs scratch at equal additional FLOPs")


def write_plot(r: dict, path: str) -> str:
    """Two honest panels: total FLOPs (sunk cost visible) and additional FLOPs (the paper's comparison)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = _plot_labels(r)
    _plot_total(ax1, r, labels)
    _plot_additional(ax2, r, labels)
    for ax in (ax1, ax2):
        ax.set_ylabel("validation loss (nats/token)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
