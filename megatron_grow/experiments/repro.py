"""Small-scale reproduction of the paper's four findings (arXiv 2510.08008; docs/results.md).

    megatron-grow repro --tiny                 # CI scale: about 1-2 minutes on 2 CPU cores
    megatron-grow repro --size cpu             # longer CPU run (base past 1x F_c)
    megatron-grow repro --size gpu             # one GPU (not run in this repository yet)

One base MoE is trained at a constant LR and saved at three iterations (``checkpoint.keep_last``
keeps them all). Every later run starts from those checkpoints (or from random init) and trains
for the same number of steps with the same batch, so runs of the same architecture spend the
same *additional* FLOPs (checked from the trainer's counters), and every run is evaluated on the
same validation tokens (``data.eval_samples``; checked from the recorded token digests):

(a) grown vs scratch at equal additional FLOPs: depth interposition (k=2) from the last base
    checkpoint vs the same architecture from random init and, except with --tiny, the paper's
    full recipe (depth interposition then width x2, alpha 0.01, top-k x2) vs its architecture
    from random init;
(b) interposition vs stack (depth k=2) from the last base checkpoint, with the base's sunk
    FLOPs in units of the Chinchilla reference F_c = 6 N_a (20 N_a) (docs/results.md);
(c) width growth (experts x2, top-k x2, Gaussian noise) with alpha in {0, 0.01, 0.1};
(d) final loss vs sunk cost: depth interposition from each of the three base checkpoints
    (and sunk cost 0 = the scratch run of (a)), each with the same additional budget.

All training and growth runs share ONE set of processes (``run_in_processes``, 2 ranks on CPU):
the trainer re-initialises the model-parallel state for every run, and state crosses runs only
through checkpoints on disk. Tables and plots: :mod:`megatron_grow.experiments.repro_report`.

Outputs in WORKDIR: ``results.json`` (every number), ``results.md`` (the tables), the plots
``a_grown_vs_scratch.png``, ``b_interposition_vs_stack.png``, ``c_width_alpha.png``,
``d_sunk_cost.png``, and ``recipes/`` (ordinary recipes ``megatron-grow train`` accepts).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Sequence

import torch
from megatron.core.transformer.moe import moe_utils

from megatron_grow.checkpoint import paths
from megatron_grow.config.check import built_model
from megatron_grow.experiments import demo
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
    prepare_data,
    resolve_texts,
    scratch_model_section,
    spawn,
    train_phase_body,
    training_section,
    write_json,
    write_recipe,
)
from megatron_grow.experiments.repro_report import format_markdown, write_plots
from megatron_grow.models.params import count_params
from megatron_grow.training.flops import chinchilla_flops

SIZES = {
    # CI: every run of all four findings in about a minute of training on 2 CPU cores. The base
    # sees far less than 1x F_c (the results say so).
    "tiny": ExperimentSize("tiny", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                           kv_channels=8, num_moe_experts=4, moe_router_topk=1, moe_ffn_hidden_size=32,
                           seq_length=32, micro_batch_size=8, global_batch_size=16, base_iters=60,
                           grown_iters=20, eval_interval=10, eval_iters=2, lr=3e-3),
    # CPU, longer: the demo's architecture; the base's last checkpoint is past 1x F_c (~1.25 F_c).
    "cpu": ExperimentSize("cpu", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                          kv_channels=16, num_moe_experts=4, moe_router_topk=1, moe_ffn_hidden_size=64,
                          seq_length=64, micro_batch_size=8, global_batch_size=16, base_iters=3300,
                          grown_iters=400, eval_interval=50, eval_iters=4, lr=3e-3),
    # One GPU (H100): 15M-parameter base (4.5M activated), grown models 29M (depth) to 54M (depth
    # + width); the base's last checkpoint at ~1.2 F_c. NOT RUN YET (see docs/results.md).
    "gpu": ExperimentSize("gpu", num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
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


def choose_size(size: str, tiny: bool) -> ExperimentSize:
    if tiny:
        return SIZES["tiny"]
    if size == "auto":
        size = "gpu" if torch.cuda.is_available() else "cpu"
    if size not in ("cpu", "gpu"):
        raise ValueError(f"unknown size {size!r}; choose cpu, gpu or auto (or --tiny)")
    return SIZES[size]


def with_full_recipe(size: ExperimentSize) -> bool:
    """(a) also compares the paper's full recipe (depth then width) with scratch, except in --tiny:
    its two largest runs would double the CI time, and tests/functional/test_demo.py covers it."""
    return size.name != "tiny"


def checkpoint_iterations(size: ExperimentSize) -> list[int]:
    step = size.base_iters // NUM_CHECKPOINTS
    if step * NUM_CHECKPOINTS != size.base_iters or step % size.eval_interval:
        raise ValueError(f"size {size.name}: base_iters must split into {NUM_CHECKPOINTS} saves that are "
                         f"multiples of eval_interval")
    return [step * (i + 1) for i in range(NUM_CHECKPOINTS)]


# ------------------------------------------------------------------------------------------------
# The plan: recipes and the ordered list of runs


class _Plan:
    """Writes every recipe of the reproduction and collects the ordered runs and their metadata."""

    def __init__(self, workdir: str, size: ExperimentSize, ranks: int, data: dict, seed: int):
        self.size, self.seed = size, seed
        self.runs_dir = os.path.join(workdir, "runs")
        self.recipe_dir = os.path.join(workdir, "recipes")
        self.common = common_sections(size, ranks, data)
        self.training = training_section(size, seed=seed)
        self.base_model = base_model_section(size)
        self.base_dir = os.path.join(self.runs_dir, "base")
        self.steps, self.meta = [], {}

    def base(self, save_interval: int) -> None:
        s = self.size
        raw = dict(self.common, model=self.base_model, training=dict(self.training, train_iters=s.base_iters),
                   checkpoint={"save": self.base_dir, "load": self.base_dir, "save_interval": save_interval,
                               "keep_last": NUM_CHECKPOINTS + 2})
        recipe, path = write_recipe(self.recipe_dir, "base", raw)
        self.steps.append({"name": "base", "kind": "train", "recipe": path})
        self.meta["base"] = {"model": recipe.model, "from_iteration": None, "growth": None}

    def grown(self, name: str, growth: dict, from_iter: int):
        """A growth of the base checkpoint at ``from_iter`` into runs/NAME_init, then training on."""
        init = os.path.join(self.runs_dir, name + "_init")
        raw = dict(self.common, model=self.base_model, growth=growth,
                   training=dict(self.training, train_iters=from_iter + self.size.grown_iters),
                   checkpoint={"load": init, "save": None, "save_interval": self.size.grown_iters, "keep_last": 1})
        recipe, path = write_recipe(self.recipe_dir, name, raw)
        self.steps.append({"name": name, "kind": "grow_train", "recipe": path,
                           "source": paths.iteration_dir(self.base_dir, from_iter), "grown": init})
        self.meta[name] = {"model": built_model(recipe), "from_iteration": from_iter, "growth": growth}
        return self.meta[name]["model"]

    def scratch(self, name: str, target) -> None:
        raw = dict(self.common, model=scratch_model_section(target),
                   training=dict(self.training, train_iters=self.size.grown_iters),
                   checkpoint={"save": None, "load": None, "save_interval": self.size.grown_iters, "keep_last": 1})
        _, path = write_recipe(self.recipe_dir, name, raw)
        self.steps.append({"name": name, "kind": "train", "recipe": path})
        self.meta[name] = {"model": target, "from_iteration": 0, "growth": None}


def build_plan(workdir: str, size: ExperimentSize, ranks: int, data: dict, seed: int) -> tuple[list, dict]:
    """Write every recipe; return (steps for :func:`repro_body`, {run name: metadata})."""
    plan = _Plan(workdir, size, ranks, data, seed)
    ckpts = checkpoint_iterations(size)
    last = ckpts[-1]
    plan.base(save_interval=ckpts[0])
    depth_target = plan.grown("interposition", depth_growth("interposition", seed), last)
    plan.grown("stack", depth_growth("stack", seed), last)
    plan.scratch("scratch_depth", depth_target)
    for it in ckpts[:-1]:
        plan.grown(f"interposition_at_{it}", depth_growth("interposition", seed), it)
    for alpha in ALPHAS:
        plan.grown(f"width_alpha_{alpha:g}", width_growth(alpha, seed), last)
    if with_full_recipe(size):
        plan.scratch("scratch_full", plan.grown("full", full_growth(seed), last))
    return plan.steps, plan.meta


# ------------------------------------------------------------------------------------------------
# The body run on every rank (module level, so that spawned processes can import it)


def repro_body(steps: list) -> dict:
    """Every run of the plan, in order, in the same processes: ``train`` (the resume-aware training
    body) or ``grow_train`` (``grow_checkpoint`` into a fresh directory, then training)."""
    out = {}
    for step in steps:
        t0 = time.perf_counter()
        # MCore's layer-wise aux-loss tracker is a process global sized by the first model's
        # layer count; a deeper model in the same process would index past it.
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
        grow = None
        if step["kind"] == "grow_train":
            grow = grow_body(step["source"], step["grown"], step["recipe"], verify=False, progress=False)
        result = train_phase_body(step["recipe"])
        if grow is not None:
            result["grow"] = grow
        result["seconds"] = time.perf_counter() - t0
        out[step["name"]] = result
    return out


# ------------------------------------------------------------------------------------------------
# Orchestration


def run_repro(workdir: str = "runs/repro", size: str = "auto", tiny: bool = False, ranks: int | None = None,
              texts: Sequence[str] | None = None, seed: int = 1234) -> dict:
    """Every run of the four findings; returns the summary also written to WORKDIR/results.json."""
    t_start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    rsize = choose_size(size, tiny)
    ranks = ranks or default_ranks(rsize)
    texts = resolve_texts(texts)
    load = load_average()
    _say(f"size {rsize.name}, {ranks} rank(s), seed {seed}, workdir {workdir}; load average {load}")
    data = prepare_data(workdir, texts, rsize.vocab_size, say=_say)
    timings = {"data": data["seconds"]}
    shutil.rmtree(os.path.join(workdir, "runs"), ignore_errors=True)  # training starts over; the data is reused
    steps, meta = build_plan(workdir, rsize, ranks, data, seed)
    _say(f"{len(steps)} runs in one set of {ranks} processes: " + ", ".join(s["name"] for s in steps))
    t0 = time.perf_counter()
    results = spawn(repro_body, ranks, (steps,), timeout=6 * 3600.0)
    timings["runs"] = time.perf_counter() - t0
    for name, r in results.items():
        check_run(name, r)
        timings[name] = r["seconds"]
    summary = summarize(rsize, ranks, seed, texts, data, meta, results)
    timings["total"] = time.perf_counter() - t_start
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    summary["load_average_start"], summary["load_average_end"] = load, load_average()
    summary["workdir"] = workdir
    _write_outputs(workdir, summary)
    _say(f"total wall time {timings['total']:.1f}s (load average at the end {summary['load_average_end']})")
    return summary


def _write_outputs(workdir: str, summary: dict) -> None:
    summary["plots"] = write_plots(summary, workdir)
    md = format_markdown(summary)
    summary["markdown"] = md
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(md + "\n")
    write_json(os.path.join(workdir, "results.json"), summary)
    print(md, flush=True)
    _say(f"wrote {os.path.join(workdir, 'results.md')}, results.json and {len(summary['plots'])} plots")


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


def _run_summary(name: str, r: dict, m: dict, size: ExperimentSize, flops_per_step: float, base_curve: list) -> dict:
    """One run's curve and numbers; checks that a grown run's sunk cost is the base's at its iteration."""
    start_flops = r["start_counters"]["flops_so_far"] if r["start_counters"] else 0.0
    if name != "base" and m["from_iteration"]:
        sunk_expected = flops_per_step * m["from_iteration"]
        if not math.isclose(r["counters"]["sunk_flops"], sunk_expected, rel_tol=1e-9):
            raise RuntimeError(f"{name}: sunk FLOPs {r['counters']['sunk_flops']:.4e} != the base's "
                               f"{sunk_expected:.4e} at iteration {m['from_iteration']}")
    curve = _curve(r, start_flops) if name != "base" else base_curve
    return {
        "model": model_summary(m["model"], size.global_batch_size, size.seq_length), "growth": m["growth"],
        "from_iteration": m["from_iteration"], "sunk_flops": r["counters"]["sunk_flops"],
        "additional_flops": _additional(r), "curve": curve, "start_loss": r["start_loss"],
        "final_loss": curve[-1][1], "train_losses": r["train_losses"], "counters": r["counters"],
        "valid_tokens_sha256": r["valid_tokens_sha256"],
        "seconds": round(r["seconds"], 1), "grow_seconds": round(r["grow"]["seconds"], 2) if "grow" in r else None,
    }


def _finding_a(runs: dict, results: dict) -> list:
    def pair(grown_name, scratch_name, label):
        extra = _check_equal([grown_name, scratch_name], results)
        g, s = runs[grown_name]["curve"], runs[scratch_name]["curve"]
        g_final, s_final = runs[grown_name]["final_loss"], runs[scratch_name]["final_loss"]
        rows = [{"additional_flops": f, "grown": loss, "scratch": interpolate(s, f)} for f, loss in g]
        reach = next((f for f, loss in s if loss <= g_final), None)
        return {"label": label, "grown": grown_name, "scratch": scratch_name, "additional_flops": extra,
                "grown_final": g_final, "scratch_final": s_final, "grown_minus_scratch": g_final - s_final,
                "scratch_flops_to_reach_grown_final": reach, "rows": rows}

    a = [pair("interposition", "scratch_depth", "depth interposition x2")]
    if "full" in results:
        a.append(pair("full", "scratch_full", "depth interposition x2, then width x2 (alpha 0.01, top-k x2)"))
    return a


def _finding_b(runs: dict, results: dict, n_a: int, f_c: float) -> dict:
    sunk_last = runs["interposition"]["sunk_flops"]
    final = {mode: runs[mode]["final_loss"] for mode in ("interposition", "stack")}
    return {"base_sunk_flops": sunk_last, "chinchilla_flops": f_c, "base_activated_params": n_a,
            "sunk_over_fc": sunk_last / f_c, "reached_1x_fc": sunk_last >= f_c,
            "additional_flops": _check_equal(["interposition", "stack"], results),
            "rows": [{"mode": mode, "start_loss": runs[mode]["start_loss"], "final_loss": final[mode]}
                     for mode in ("interposition", "stack")],
            "interposition_minus_stack": final["interposition"] - final["stack"],
            "start_interposition_minus_stack": runs["interposition"]["start_loss"] - runs["stack"]["start_loss"]}


def _finding_c(runs: dict, results: dict, base_final: float) -> dict:
    names = [f"width_alpha_{alpha:g}" for alpha in ALPHAS]
    c = {"additional_flops": _check_equal(names, results), "base_final_loss": base_final,
         "rows": [{"alpha": alpha, "run": n, "start_loss": runs[n]["start_loss"], "final_loss": runs[n]["final_loss"]}
                  for alpha, n in zip(ALPHAS, names)]}
    c["best_alpha"] = min(c["rows"], key=lambda row: row["final_loss"])["alpha"]
    return c


def _finding_d(runs: dict, results: dict, ckpts: list, base_at: dict, f_c: float) -> dict:
    names = ["scratch_depth"] + [f"interposition_at_{it}" for it in ckpts[:-1]] + ["interposition"]
    rows = []
    for name, it in zip(names, [0] + ckpts):
        sunk = runs[name]["sunk_flops"]
        rows.append({"run": name, "base_iteration": it, "sunk_flops": sunk, "sunk_over_fc": sunk / f_c,
                     "base_loss": base_at[it][0] if it else None, "start_loss": runs[name]["start_loss"],
                     "final_loss": runs[name]["final_loss"]})
    finals = [row["final_loss"] for row in rows]
    return {"additional_flops": _check_equal(names, results), "rows": rows,
            "final_loss_monotone_in_sunk": all(x > y for x, y in zip(finals, finals[1:])),
            "spearman_sunk_vs_final": _spearman([row["sunk_flops"] for row in rows], finals)}


def summarize(size: ExperimentSize, ranks: int, seed: int, texts, data, meta: dict, results: dict) -> dict:
    """Every run's curve and the four findings, each checked to compare equal additional FLOPs."""
    base = results["base"]
    n_a = count_params(meta["base"]["model"]).activated
    f_c = chinchilla_flops(n_a)
    base_curve = [(0.0, base["start_loss"])] + [(f, loss) for _, loss, f in base["valid_losses"]]
    base_at = {it: (loss, f) for it, loss, f in base["valid_losses"]}
    ckpts = checkpoint_iterations(size)
    flops_per_step = base["counters"]["flops_so_far"] / base["counters"]["iteration"]
    runs = {name: _run_summary(name, r, meta[name], size, flops_per_step, base_curve) for name, r in results.items()}
    return {
        "size": dataclasses.asdict(size), "ranks": ranks, "seed": seed, "texts": texts,
        "dataset": {"prefix": data["prefix"], "tokenizer_model": data["tokenizer_model"]},
        "validation": {"samples": size.eval_samples, "tokens_sha256": check_same_validation(results)},
        "checkpoint_iterations": ckpts, "flops_per_base_step": flops_per_step,
        "base": {"activated_params": n_a, "chinchilla_flops": f_c, "final_loss": base_curve[-1][1],
                 "checkpoints": [{"iteration": it, "sunk_flops": base_at[it][1], "sunk_over_fc": base_at[it][1] / f_c,
                                  "valid_loss": base_at[it][0]} for it in ckpts]},
        "runs": runs,
        "findings": {"a_grown_vs_scratch": _finding_a(runs, results),
                     "b_interposition_vs_stack": _finding_b(runs, results, n_a, f_c),
                     "c_width_alpha": _finding_c(runs, results, base_curve[-1][1]),
                     "d_sunk_cost": _finding_d(runs, results, ckpts, base_at, f_c)},
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
