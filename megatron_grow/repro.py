"""Small-scale reproduction of the paper's four findings (arXiv 2510.08008; docs/paper.md §1.3, §2.1, §6.2-6.3).

    python scripts/repro/repro.py --tiny                 # CI scale: about 1-2 minutes on 2 CPU cores
    python scripts/repro/repro.py --size cpu             # longer CPU run (base past 1x F_c)
    python scripts/repro/repro.py --size gpu             # one GPU (not run in this repository yet)

One base MoE is trained at a constant LR and saved at three iterations (``checkpoint.keep_last``
keeps them all). Every later run starts from those checkpoints (or from random init) and trains
for the same number of steps with the same batch, so runs of the same architecture spend the
same *additional* FLOPs (checked from the trainer's counters):

(a) grown vs scratch at equal additional FLOPs: depth interposition (k=2) from the last base
    checkpoint vs the same architecture from random init and, except with --tiny, the paper's
    full recipe (depth interposition then width x2, alpha 0.01, top-k x2) vs its architecture
    from random init;
(b) interposition vs stack (depth k=2) from the last base checkpoint, with the base's sunk
    FLOPs in units of the Chinchilla reference F_c = 6 N_a (20 N_a) (docs/paper.md §1.3, §7);
(c) width growth (experts x2, top-k x2, Gaussian noise) with alpha in {0, 0.01, 0.1};
(d) final loss vs sunk cost: depth interposition from each of the three base checkpoints
    (and sunk cost 0 = the scratch run of (a)), each with the same additional budget.

All training and growth runs share ONE set of processes (``run_in_processes``, 2 ranks on CPU):
the trainer re-initialises the model-parallel state for every run, and state crosses runs only
through checkpoints on disk. Building blocks come from :mod:`megatron_grow.demo` (data, recipe
sections, the resume-aware training body with its start-of-run validation, the curve helpers).

Outputs in WORKDIR: ``results.json`` (every number), ``results.md`` (the tables), the plots
``a_grown_vs_scratch.png``, ``b_interposition_vs_stack.png``, ``c_width_alpha.png``,
``d_sunk_cost.png``, and ``recipes/`` (ordinary recipes ``megatron-grow train`` accepts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence

from megatron_grow import demo
from megatron_grow.demo import DemoSize

SIZES = {
    # CI: every run of all four findings in about a minute of training on 2 CPU cores. The base
    # sees far less than 1x F_c (the results say so).
    "tiny": DemoSize("tiny", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                     kv_channels=8, num_moe_experts=4, moe_router_topk=1, moe_ffn_hidden_size=32,
                     seq_length=32, micro_batch_size=8, global_batch_size=16, base_iters=60,
                     grown_iters=20, eval_interval=10, eval_iters=2, lr=3e-3),
    # CPU, longer: the demo's architecture; the base's last checkpoint is past 1x F_c (~1.25 F_c).
    "cpu": DemoSize("cpu", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    kv_channels=16, num_moe_experts=4, moe_router_topk=1, moe_ffn_hidden_size=64,
                    seq_length=64, micro_batch_size=8, global_batch_size=16, base_iters=3300,
                    grown_iters=400, eval_interval=50, eval_iters=4, lr=3e-3),
    # One GPU (H100): 15M-parameter base (4.5M activated), grown models 29M (depth) to 54M (depth
    # + width); the base's last checkpoint at ~1.2 F_c. NOT RUN YET (see docs/results.md).
    "gpu": DemoSize("gpu", num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                    kv_channels=32, num_moe_experts=8, moe_router_topk=1, moe_ffn_hidden_size=512,
                    seq_length=256, micro_batch_size=32, global_batch_size=64, base_iters=7500,
                    grown_iters=1500, eval_interval=100, eval_iters=8, lr=2e-3, vocab_size=4096),
}

NUM_CHECKPOINTS = 3  # base checkpoints for (d): iterations base_iters * i / 3
ALPHAS = (0.0, 0.01, 0.1)


def depth_growth(mode: str, seed: int) -> dict:
    return {"order": ["depth"], "depth": {"mode": mode, "factor": 2}, "seed": seed}


def width_growth(alpha: float, seed: int) -> dict:
    return {"order": ["width"], "width": {"factor": 2, "noise": "gaussian", "alpha": alpha}, "seed": seed}


def full_growth(seed: int) -> dict:
    return dict(demo.GROWTH, seed=seed)  # the paper's recipe: depth interposition x2, then width x2


def _say(msg: str) -> None:
    print(f"[repro] {msg}", flush=True)


def choose_size(size: str, tiny: bool) -> DemoSize:
    if tiny:
        return SIZES["tiny"]
    if size == "auto":
        import torch

        size = "gpu" if torch.cuda.is_available() else "cpu"
    if size not in ("cpu", "gpu"):
        raise ValueError(f"unknown size {size!r}; choose cpu, gpu or auto (or --tiny)")
    return SIZES[size]


def with_full_recipe(size: DemoSize) -> bool:
    """(a) also compares the paper's full recipe (depth then width) with scratch, except in --tiny:
    its two largest runs would double the CI time, and tests/functional/test_demo.py covers it."""
    return size.name != "tiny"


def checkpoint_iterations(size: DemoSize) -> list[int]:
    step = size.base_iters // NUM_CHECKPOINTS
    if step * NUM_CHECKPOINTS != size.base_iters or step % size.eval_interval:
        raise ValueError(f"size {size.name}: base_iters must split into {NUM_CHECKPOINTS} saves that are "
                         f"multiples of eval_interval")
    return [step * (i + 1) for i in range(NUM_CHECKPOINTS)]


# ------------------------------------------------------------------------------------------------
# The plan: recipes and the ordered list of runs


def build_plan(workdir: str, size: DemoSize, ranks: int, data: dict, seed: int) -> tuple[list, dict]:
    """Write every recipe; return (steps for :func:`repro_body`, {run name: metadata})."""
    import yaml

    from megatron_grow.checkpoint import layout
    from megatron_grow.config.loader import load_recipe, recipe_to_dict
    from megatron_grow.growth.plan import make_growth_plan

    runs = os.path.join(workdir, "runs")
    rdir = os.path.join(workdir, "recipes")
    os.makedirs(rdir, exist_ok=True)
    common = demo.common_sections(size, ranks, data)
    training = demo.training_section(size, seed=seed)
    base_model = demo.base_model_section(size)
    ckpts = checkpoint_iterations(size)
    base_dir = os.path.join(runs, "base")
    steps, meta = [], {}

    def write(name, raw):
        recipe = load_recipe(raw=raw)  # validate before anything runs
        path = os.path.join(rdir, f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(raw, f, sort_keys=False)
        return recipe, path

    base_raw = dict(common, model=base_model, training=dict(training, train_iters=size.base_iters),
                    checkpoint={"save": base_dir, "load": base_dir, "save_interval": ckpts[0],
                                "keep_last": NUM_CHECKPOINTS + 2})
    base_recipe, path = write("base", base_raw)
    steps.append({"name": "base", "kind": "train", "recipe": path})
    meta["base"] = {"model": base_recipe.model, "from_iteration": None, "growth": None}

    def grown(name, growth, from_iter):
        target = make_growth_plan(base_recipe.model, load_recipe(raw=dict(base_raw, growth=growth)).growth).target
        init = os.path.join(runs, name + "_init")
        raw = dict(common, model=base_model, growth=growth,
                   training=dict(training, train_iters=from_iter + size.grown_iters),
                   checkpoint={"load": init, "save": None, "save_interval": size.grown_iters, "keep_last": 1})
        _, path = write(name, raw)
        steps.append({"name": name, "kind": "grow_train", "recipe": path,
                      "source": layout.iteration_dir(base_dir, from_iter), "grown": init})
        meta[name] = {"model": target, "from_iteration": from_iter, "growth": growth}
        return target

    def scratch(name, target):
        raw = dict(common, model=recipe_to_dict(target), training=dict(training, train_iters=size.grown_iters),
                   checkpoint={"save": None, "load": None, "save_interval": size.grown_iters, "keep_last": 1})
        _, path = write(name, raw)
        steps.append({"name": name, "kind": "train", "recipe": path})
        meta[name] = {"model": target, "from_iteration": 0, "growth": None}

    last = ckpts[-1]
    depth_target = grown("interposition", depth_growth("interposition", seed), last)
    grown("stack", depth_growth("stack", seed), last)
    scratch("scratch_depth", depth_target)
    for it in ckpts[:-1]:
        grown(f"interposition_at_{it}", depth_growth("interposition", seed), it)
    for alpha in ALPHAS:
        grown(f"width_alpha_{alpha:g}", width_growth(alpha, seed), last)
    if with_full_recipe(size):
        full_target = grown("full", full_growth(seed), last)
        scratch("scratch_full", full_target)
    return steps, meta


# ------------------------------------------------------------------------------------------------
# The body run on every rank (module level, so that spawned processes can import it)


def _grow(source: str, grown: str, recipe_path: str) -> dict:
    from megatron_grow.config.loader import load_recipe, recipe_to_dict
    from megatron_grow.growth.grow import grow_checkpoint

    t0 = time.perf_counter()
    recipe = load_recipe(recipe_path)
    summary = grow_checkpoint(source, grown, recipe.growth, recipe.parallel, recipe_dict=recipe_to_dict(recipe),
                              overwrite=True, seed=recipe.training.seed, progress=False)
    return {"summary": summary, "seconds": time.perf_counter() - t0}


def repro_body(steps: list) -> dict:
    """Every run of the plan, in order, in the same processes: ``train`` (the demo's resume-aware
    training body) or ``grow_train`` (``grow_checkpoint`` into a fresh directory, then training)."""
    from megatron.core.transformer.moe import moe_utils

    out = {}
    for step in steps:
        t0 = time.perf_counter()
        # MCore's layer-wise aux-loss tracker is a process global sized by the first model's
        # layer count; a deeper model in the same process would index past it.
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
        grow = _grow(step["source"], step["grown"], step["recipe"]) if step["kind"] == "grow_train" else None
        result = demo.train_phase_body(step["recipe"])
        if grow is not None:
            result["grow"] = grow
        result["seconds"] = time.perf_counter() - t0
        out[step["name"]] = result
    return out


# ------------------------------------------------------------------------------------------------
# Orchestration


def run_repro(workdir: str = "runs/repro", size: str = "auto", tiny: bool = False, ranks: int | None = None,
              texts: Sequence[str] | None = None, seed: int = 1234) -> dict:
    t_start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    rsize = choose_size(size, tiny)
    ranks = ranks or demo.default_ranks(rsize)
    texts = [os.path.abspath(t) for t in (texts or [demo.REPO_CORPUS])]
    for t in texts:
        if not os.path.isfile(t):
            raise FileNotFoundError(f"--text {t}: no such file")
    load = demo._load_average()
    _say(f"size {rsize.name}, {ranks} rank(s), seed {seed}, workdir {workdir}; load average {load}")
    timings = {}
    data = demo.prepare_data(workdir, texts, rsize.vocab_size, workers=max(1, min(2, os.cpu_count() or 1)))
    timings["data"] = data["seconds"]
    runs = os.path.join(workdir, "runs")
    shutil.rmtree(runs, ignore_errors=True)  # training starts over; the data is reused
    steps, meta = build_plan(workdir, rsize, ranks, data, seed)
    _say(f"{len(steps)} runs in one set of {ranks} processes: " + ", ".join(s["name"] for s in steps))
    t0 = time.perf_counter()
    results = demo._spawn(repro_body, ranks, (steps,), timeout=6 * 3600.0)
    timings["runs"] = time.perf_counter() - t0
    for name, r in results.items():
        demo._check_run(name, r)
        timings[name] = r["seconds"]
    summary = summarize(rsize, ranks, seed, texts, data, meta, results)
    timings["total"] = time.perf_counter() - t_start
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    summary["load_average_start"] = load
    summary["load_average_end"] = demo._load_average()
    summary["workdir"] = workdir
    summary["plots"] = write_plots(summary, workdir)
    md = format_markdown(summary)
    summary["markdown"] = md
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(md, flush=True)
    _say(f"wrote {os.path.join(workdir, 'results.md')}, results.json and {len(summary['plots'])} plots")
    _say(f"total wall time {timings['total']:.1f}s (load average at the end {summary['load_average_end']})")
    return summary


# ------------------------------------------------------------------------------------------------
# Numbers


def _curve(run: dict, start_flops: float) -> list:
    """(additional FLOPs, validation loss), starting with the evaluation before the first step."""
    sunk = run["counters"]["sunk_flops"]
    pts = [(start_flops - sunk, run["start_loss"])] if run["start_loss"] is not None else []
    return pts + [(f - sunk, loss) for _, loss, f in run["valid_losses"]]


def _additional(run: dict) -> float:
    return run["counters"]["flops_so_far"] - run["counters"]["sunk_flops"]


def _check_equal(names: Sequence[str], results: dict) -> float:
    extra = [_additional(results[n]) for n in names]
    if not all(math.isclose(e, extra[0], rel_tol=1e-9) for e in extra) or extra[0] <= 0:
        raise RuntimeError("additional FLOPs differ: " + ", ".join(f"{n} {e:.4e}" for n, e in zip(names, extra)))
    return extra[0]


def summarize(size: DemoSize, ranks: int, seed: int, texts, data, meta: dict, results: dict) -> dict:
    import dataclasses

    from megatron_grow.models.params import count_params
    from megatron_grow.training.flops import chinchilla_flops

    gbs, seq = size.global_batch_size, size.seq_length
    base = results["base"]
    base_model = meta["base"]["model"]
    n_a = count_params(base_model).activated
    f_c = chinchilla_flops(n_a)
    base_curve = [(0.0, base["start_loss"])] + [(f, loss) for _, loss, f in base["valid_losses"]]
    base_at = {it: (loss, f) for it, loss, f in base["valid_losses"]}
    ckpts = checkpoint_iterations(size)
    flops_per_step = base["counters"]["flops_so_far"] / base["counters"]["iteration"]

    runs = {}
    for name, r in results.items():
        m = meta[name]
        start_flops = r["start_counters"]["flops_so_far"] if r["start_counters"] else 0.0
        if name != "base" and m["from_iteration"]:
            sunk_expected = flops_per_step * m["from_iteration"]
            if not math.isclose(r["counters"]["sunk_flops"], sunk_expected, rel_tol=1e-9):
                raise RuntimeError(f"{name}: sunk FLOPs {r['counters']['sunk_flops']:.4e} != the base's "
                                   f"{sunk_expected:.4e} at iteration {m['from_iteration']}")
        curve = _curve(r, start_flops) if name != "base" else base_curve
        runs[name] = {
            "model": demo._model_summary(m["model"], gbs, seq), "growth": m["growth"],
            "from_iteration": m["from_iteration"], "sunk_flops": r["counters"]["sunk_flops"],
            "additional_flops": _additional(r), "curve": curve, "start_loss": r["start_loss"],
            "final_loss": curve[-1][1], "train_losses": r["train_losses"], "counters": r["counters"],
            "seconds": round(r["seconds"], 1),
            "grow_seconds": round(r["grow"]["seconds"], 2) if "grow" in r else None,
        }

    def final(name):
        return runs[name]["final_loss"]

    def pair(grown_name, scratch_name, label):
        extra = _check_equal([grown_name, scratch_name], results)
        g, s = runs[grown_name]["curve"], runs[scratch_name]["curve"]
        rows = [{"additional_flops": f, "grown": loss, "scratch": demo.interpolate(s, f)} for f, loss in g]
        reach = next((f for f, loss in s if loss <= final(grown_name)), None)
        return {"label": label, "grown": grown_name, "scratch": scratch_name, "additional_flops": extra,
                "grown_final": final(grown_name), "scratch_final": final(scratch_name),
                "grown_minus_scratch": final(grown_name) - final(scratch_name),
                "scratch_flops_to_reach_grown_final": reach, "rows": rows}

    a = [pair("interposition", "scratch_depth", "depth interposition x2")]
    if "full" in results:
        a.append(pair("full", "scratch_full", "depth interposition x2, then width x2 (alpha 0.01, top-k x2)"))

    sunk_last = runs["interposition"]["sunk_flops"]
    b_extra = _check_equal(["interposition", "stack"], results)
    b = {"base_sunk_flops": sunk_last, "chinchilla_flops": f_c, "base_activated_params": n_a,
         "sunk_over_fc": sunk_last / f_c, "reached_1x_fc": sunk_last >= f_c, "additional_flops": b_extra,
         "rows": [{"mode": mode, "start_loss": runs[mode]["start_loss"], "final_loss": final(mode)}
                  for mode in ("interposition", "stack")],
         "interposition_minus_stack": final("interposition") - final("stack"),
         "start_interposition_minus_stack": runs["interposition"]["start_loss"] - runs["stack"]["start_loss"]}

    c_names = [f"width_alpha_{alpha:g}" for alpha in ALPHAS]
    c = {"additional_flops": _check_equal(c_names, results), "base_final_loss": base_curve[-1][1],
         "rows": [{"alpha": alpha, "run": n, "start_loss": runs[n]["start_loss"], "final_loss": final(n)}
                  for alpha, n in zip(ALPHAS, c_names)]}
    best = min(c["rows"], key=lambda row: row["final_loss"])
    c["best_alpha"] = best["alpha"]

    d_names = ["scratch_depth"] + [f"interposition_at_{it}" for it in ckpts[:-1]] + ["interposition"]
    d_rows = []
    for name, it in zip(d_names, [0] + ckpts):
        sunk = runs[name]["sunk_flops"]
        d_rows.append({"run": name, "base_iteration": it, "sunk_flops": sunk, "sunk_over_fc": sunk / f_c,
                       "base_loss": base_at[it][0] if it else None, "start_loss": runs[name]["start_loss"],
                       "final_loss": final(name)})
    finals = [row["final_loss"] for row in d_rows]
    d = {"additional_flops": _check_equal(d_names, results), "rows": d_rows,
         "final_loss_monotone_in_sunk": all(x > y for x, y in zip(finals, finals[1:])),
         "spearman_sunk_vs_final": _spearman([row["sunk_flops"] for row in d_rows], finals)}
    return {
        "size": dataclasses.asdict(size), "ranks": ranks, "seed": seed, "texts": texts,
        "dataset": {"prefix": data["prefix"], "tokenizer_model": data["tokenizer_model"]},
        "checkpoint_iterations": ckpts, "flops_per_base_step": flops_per_step,
        "base": {"activated_params": n_a, "chinchilla_flops": f_c, "final_loss": base_curve[-1][1],
                 "checkpoints": [{"iteration": it, "sunk_flops": base_at[it][1], "sunk_over_fc": base_at[it][1] / f_c,
                                  "valid_loss": base_at[it][0]} for it in ckpts]},
        "runs": runs,
        "findings": {"a_grown_vs_scratch": a, "b_interposition_vs_stack": b, "c_width_alpha": c,
                     "d_sunk_cost": d},
    }


def _spearman(xs: list, ys: list) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")


def _arch(m: dict) -> str:
    return f"{m['layers']}L {m['experts']}E top-{m['topk']}"


def format_markdown(r: dict) -> str:
    f = r["findings"]
    s = r["size"]
    base = r["runs"]["base"]
    bm = base["model"]
    lines = [
        f"# Reproduction results: size `{s['name']}`, seed {r['seed']}, {r['ranks']} rank(s)",
        "",
        f"Base: {_arch(bm)}, H {s['hidden_size']}, {bm['params']['total']:,} parameters "
        f"({r['base']['activated_params']:,} activated), {s['base_iters']} steps of {s['global_batch_size']} x "
        f"{s['seq_length']} tokens at a constant LR {s['lr']:g}; saved at iterations "
        f"{', '.join(map(str, r['checkpoint_iterations']))}. Every later run: {s['grown_iters']} steps, same batch. "
        f"Chinchilla reference F_c = 6 N_a (20 N_a) = {r['base']['chinchilla_flops']:.3e} FLOPs.",
        f"Validation loss in nats/token on the same {s['eval_iters']} x {s['global_batch_size']} x "
        f"{s['seq_length']} tokens for every run. Wall time {r['timings_s']['total']:.0f} s.",
        "",
        "## (a) Grown vs scratch at equal additional FLOPs",
        "",
        "| growth | architecture | additional FLOPs | grown start | grown final | scratch final | grown - scratch |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in f["a_grown_vs_scratch"]:
        g = r["runs"][p["grown"]]
        lines.append(f"| {p['label']} | {_arch(g['model'])} | {p['additional_flops']:.3e} | {g['start_loss']:.4f} | "
                     f"{p['grown_final']:.4f} | {p['scratch_final']:.4f} | {p['grown_minus_scratch']:+.4f} |")
    lines.append("")
    for p in f["a_grown_vs_scratch"]:
        reach = p["scratch_flops_to_reach_grown_final"]
        lines.append(f"- {p['label']}: " + (f"scratch reached the grown model's final loss after {reach:.3e} "
                                            "additional FLOPs." if reach is not None else
                                            "scratch did not reach the grown model's final loss within the "
                                            "same additional FLOPs."))
    b = f["b_interposition_vs_stack"]
    lines += [
        "",
        "## (b) Interposition vs stack (depth x2, from the last base checkpoint)",
        "",
        f"Base sunk cost {b['base_sunk_flops']:.3e} FLOPs = **{b['sunk_over_fc']:.3f} F_c** "
        f"(N_a = {b['base_activated_params']:,}); 1x F_c "
        + ("**reached**." if b["reached_1x_fc"] else "**not reached** (the paper's regime where interposition "
                                                     "wins starts at about 1x F_c)."),
        "",
        "| mode | loss right after growth | final loss |",
        "|---|---|---|",
    ]
    for row in b["rows"]:
        lines.append(f"| {row['mode']} | {row['start_loss']:.4f} | {row['final_loss']:.4f} |")
    lines += ["", f"Interposition - stack: {b['start_interposition_minus_stack']:+.4f} right after growth, "
                  f"{b['interposition_minus_stack']:+.4f} at the end ({b['additional_flops']:.3e} additional FLOPs "
                  "each)."]
    c = f["c_width_alpha"]
    lines += [
        "",
        "## (c) Width growth (experts x2, top-k x2) vs the noise scale alpha",
        "",
        "| alpha | loss right after growth | final loss |",
        "|---|---|---|",
    ]
    for row in c["rows"]:
        lines.append(f"| {row['alpha']:g} | {row['start_loss']:.4f} | {row['final_loss']:.4f} |")
    lines += ["", f"Lowest final loss at alpha = {c['best_alpha']:g}; base's final loss {c['base_final_loss']:.4f}; "
                  f"{c['additional_flops']:.3e} additional FLOPs each."]
    d = f["d_sunk_cost"]
    lines += [
        "",
        "## (d) Final loss vs sunk cost (depth interposition x2, same additional budget)",
        "",
        "| grown from | sunk FLOPs | sunk / F_c | base loss there | loss right after growth | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for row in d["rows"]:
        src = f"base iteration {row['base_iteration']}" if row["base_iteration"] else "random init (scratch)"
        bl = f"{row['base_loss']:.4f}" if row["base_loss"] is not None else "-"
        lines.append(f"| {src} | {row['sunk_flops']:.3e} | {row['sunk_over_fc']:.3f} | {bl} | "
                     f"{row['start_loss']:.4f} | {row['final_loss']:.4f} |")
    lines += ["", f"{d['additional_flops']:.3e} additional FLOPs each. Final loss strictly decreasing in sunk "
                  f"cost: {'yes' if d['final_loss_monotone_in_sunk'] else 'no'}; Spearman rank correlation "
                  f"(sunk, final loss) = {d['spearman_sunk_vs_final']:+.2f}."]
    t = r["timings_s"]
    lines += ["", "## Timings (s)", "", ", ".join(f"{k} {v:g}" for k, v in t.items()),
              f"load average at start {r['load_average_start']}, at end {r['load_average_end']}"]
    return "\n".join(lines)


def write_plots(r: dict, workdir: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = r["runs"]
    f = r["findings"]
    paths = []

    def save(fig, ax, name, title):
        ax.set_xlabel("additional FLOPs after growth (sunk cost not counted)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(workdir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    def line(ax, name, label, **kw):
        xs, ys = zip(*runs[name]["curve"])
        ax.plot(xs, ys, marker=".", label=label, **kw)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p, color in zip(f["a_grown_vs_scratch"], ("tab:red", "tab:purple")):
        arch = _arch(runs[p["grown"]]["model"])
        line(ax, p["grown"], f"grown: {p['label']} ({arch})", color=color)
        line(ax, p["scratch"], f"scratch ({arch})", color=color, linestyle="--")
    ax.axhline(r["base"]["final_loss"], color="tab:blue", linewidth=0.8, linestyle=":", label="base, final")
    save(fig, ax, "a_grown_vs_scratch.png", "(a) grown vs scratch at equal additional FLOPs")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    line(ax, "interposition", "interposition (l1 l1 l2 l2 ...)", color="tab:red")
    line(ax, "stack", "stack (l1 l2 ... l1 l2 ...)", color="tab:green")
    b = f["b_interposition_vs_stack"]
    save(fig, ax, "b_interposition_vs_stack.png",
         f"(b) depth x2 from a base at {b['sunk_over_fc']:.2f} F_c")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, color in zip(f["c_width_alpha"]["rows"], ("tab:gray", "tab:red", "tab:orange")):
        line(ax, row["run"], f"alpha = {row['alpha']:g}", color=color)
    ax.axhline(r["base"]["final_loss"], color="tab:blue", linewidth=0.8, linestyle=":", label="base, final")
    save(fig, ax, "c_width_alpha.png", "(c) width growth (experts x2, top-k x2) vs noise alpha")

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    rows = f["d_sunk_cost"]["rows"]
    for i, row in enumerate(rows):
        label = (f"from base it {row['base_iteration']} ({row['sunk_over_fc']:.2f} F_c)" if row["base_iteration"]
                 else "scratch (sunk 0)")
        line(ax, row["run"], label, color=cmap(i / max(1, len(rows) - 1)))
    ax.set_xlabel("additional FLOPs after growth (sunk cost not counted)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("(d) same additional budget from each base checkpoint", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.plot([row["sunk_flops"] for row in rows], [row["final_loss"] for row in rows], marker="o", color="tab:red")
    ax2.set_xlabel("sunk FLOPs of the base checkpoint")
    ax2.set_ylabel("final validation loss after the additional budget")
    ax2.set_title("(d) final loss vs sunk cost", fontsize=10)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, "d_sunk_cost.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/repro/repro.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/repro", help="where data, checkpoints and results go")
    p.add_argument("--tiny", action="store_true", help="CI scale (every finding, a few steps each)")
    p.add_argument("--size", choices=("cpu", "gpu", "auto"), default="auto",
                   help="model and step sizes (auto: gpu when CUDA is available); ignored with --tiny")
    p.add_argument("--ranks", type=int, default=None, help="processes (default: 2 on CPU, one per GPU)")
    p.add_argument("--seed", type=int, default=1234, help="training and growth-noise seed")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE",
                   help="corpus (.txt[.gz]/.jsonl[.gz]); default: the shipped KJV Bible")
    args = p.parse_args(argv)
    if args.ranks is not None and args.ranks < 1:
        p.error("--ranks must be >= 1")
    run_repro(workdir=args.workdir, size=args.size, tiny=args.tiny, ranks=args.ranks, texts=args.text,
              seed=args.seed)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
