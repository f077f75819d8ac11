"""The paper's four findings (arXiv 2510.08008; docs/results.md) at a scale we can run, over seeds.

    megatron-grow repro --size cpu             # ~30-45 minutes on 2 CPU cores, 3 seeds
    megatron-grow repro --tiny                 # CI: the machinery, not the science (~2 minutes)
    megatron-grow repro --size gpu [--dry-run] # one GPU

For every seed (init, training data order and growth noise; the validation tokens stay fixed),
one base MoE is trained at a constant LR and saved at four iterations i, 2i, 4i, 8i, where i is
chosen so that the first save has spent about 0.25x the Chinchilla reference compute
F_c = 120 N_a^2 (so the saves sit near 0.25, 0.5, 1 and 2 F_c). Every later run trains for the
same number of steps with the same batch, so runs of one architecture spend the same
*additional* FLOPs (checked from the trainer's counters):

(a) grown vs scratch: depth interposition x2 of the last save vs the same architecture from
    random init and (not in --tiny) the paper's full recipe (depth x2, then width x2, alpha 0.01)
    vs its architecture from random init;
(b) interposition vs stack (depth x2) from the first save (~0.25 F_c) and from the last (~2 F_c);
(c) width growth (experts x2, top-k x2) of the last save with alpha in {0, 0.01, 0.1};
(d) final loss vs sunk cost: depth interposition from every save, and sunk cost 0 (scratch).

Each seed's runs share one set of processes (``run_in_processes``); seeds run side by side
(``jobs``). The final checkpoints are scored downstream (``megatron-grow eval``'s
``evaluate_checkpoint``, the shipped ``kjv_cloze`` task) in the same processes. Numbers per seed:
:mod:`~megatron_grow.experiments.repro_summary`; means and standard errors over seeds:
:mod:`~megatron_grow.experiments.repro_stats`; tables and plots:
:mod:`~megatron_grow.experiments.repro_report`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core.transformer.moe import moe_utils

from megatron_grow.checkpoint import paths
from megatron_grow.config.check import built_model
from megatron_grow.config.loader import load_recipe
from megatron_grow.errors import UserInputError
from megatron_grow.experiments import demo
from megatron_grow.experiments.common import (
    ExperimentSize,
    base_model_section,
    check_run,
    common_sections,
    grow_body,
    library_warnings_ignored,
    load_average,
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
from megatron_grow.experiments.repro_report import format_markdown, write_plots
from megatron_grow.experiments.repro_stats import aggregate
from megatron_grow.experiments.repro_summary import ALPHAS, check_same_validation_everywhere, summarize_seed
from megatron_grow.log import component_log
from megatron_grow.models.params import count_params
from megatron_grow.training.flops import chinchilla_flops, training_flops_per_step

SAVE_MULTIPLES = (1, 2, 4, 8)  # base saves at i, 2i, 4i, 8i
EVAL_SEED = 4321  # the validation sample order: the same tokens for every run of every seed
DOWNSTREAM_TASK = "kjv_cloze"


@dataclass(frozen=True)
class ReproSize:
    """A scale of the reproduction: the architecture and batch, and what runs at it."""

    size: ExperimentSize          # base_iters is used only when first_save_fc is None
    first_save_fc: float | None   # the first base save at this multiple of F_c (None: base_iters / 8)
    seeds: tuple[int, ...]
    full_recipe: bool             # (a) also runs the paper's depth-then-width recipe and its scratch twin
    downstream: str               # which final checkpoints are scored: "all", "a" (finding (a) only), "none"
    downstream_limit: int | None  # questions per evaluation (None: the whole task)
    ranks: int                    # processes per seed on CPU (on a GPU: one per device)
    findings: tuple[str, ...] = ("a", "b", "c", "d")  # which findings' runs to train


SIZES = {
    # CI: checks the machinery (FLOPs bookkeeping, equal budgets, validation tokens, statistics),
    # not the science: the base sees ~0.03 F_c. seq 64 so that the cloze answers fit.
    "tiny": ReproSize(ExperimentSize("tiny", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                     kv_channels=8, num_moe_experts=4, moe_router_topk=1, moe_ffn_hidden_size=32,
                                     seq_length=64, micro_batch_size=8, global_batch_size=16, base_iters=64,
                                     grown_iters=16, eval_interval=8, eval_iters=2, lr=3e-3),
                      first_save_fc=None, seeds=(1234, 1235), full_recipe=False, downstream="a",
                      downstream_limit=40, ranks=2),
    # CPU: the same tiny MoE (45k activated parameters, so F_c = 2.5e11 FLOPs is within reach), base to
    # ~2 F_c; one process per seed (faster than 2 ranks at this size), two seeds side by side.
    "cpu": ReproSize(ExperimentSize("cpu", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                    kv_channels=8, num_moe_experts=4, moe_router_topk=1, moe_ffn_hidden_size=32,
                                    seq_length=64, micro_batch_size=16, global_batch_size=16, base_iters=0,
                                    grown_iters=800, eval_interval=40, eval_iters=16, lr=3e-3),
                     first_save_fc=0.25, seeds=(1234, 1235, 1236), full_recipe=True, downstream="all",
                     downstream_limit=None, ranks=1),
    # CPU, finding (b) alone on a 4-layer base (a 2-layer base leaves interposition and stack only the
    # order of the middle pair to differ in): the same width, saves at 0.25-2 F_c, 3 seeds.
    "cpu4": ReproSize(ExperimentSize("cpu4", num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                     kv_channels=8, num_moe_experts=4, moe_router_topk=1, moe_ffn_hidden_size=32,
                                     seq_length=64, micro_batch_size=16, global_batch_size=16, base_iters=0,
                                     grown_iters=800, eval_interval=40, eval_iters=16, lr=3e-3),
                      first_save_fc=0.25, seeds=(1234, 1235, 1236), full_recipe=False, downstream="none",
                      downstream_limit=None, ranks=1, findings=("b",)),
    # One GPU: a 4-layer MoE (vocabulary 4096). Defined and dry-run tested; not run in this repository.
    "gpu": ReproSize(ExperimentSize("gpu", num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                                    kv_channels=32, num_moe_experts=8, moe_router_topk=1, moe_ffn_hidden_size=512,
                                    seq_length=256, micro_batch_size=32, global_batch_size=64, base_iters=0,
                                    grown_iters=1500, eval_interval=100, eval_iters=8, lr=2e-3, vocab_size=4096),
                     first_save_fc=0.25, seeds=(1234, 1235, 1236), full_recipe=True, downstream="all",
                     downstream_limit=None, ranks=1),
}


_say = component_log("repro")


def choose_size(size: str, tiny: bool) -> ReproSize:
    return pick_size(SIZES, size, "tiny", tiny)


def base_flops_per_step(size: ExperimentSize) -> float:
    model = built_model_of_size(size)
    return training_flops_per_step(model, size.global_batch_size, size.seq_length)


def built_model_of_size(size: ExperimentSize):
    return load_recipe(raw={"model": base_model_section(size)}).model


def save_iterations(rsize: ReproSize) -> list[int]:
    """The base's four saves i, 2i, 4i, 8i: i from ``base_iters`` / 8, or the multiple of
    ``eval_interval`` nearest to ``first_save_fc`` x F_c (every save is also an evaluation)."""
    s = rsize.size
    if rsize.first_save_fc is None:
        first = s.base_iters // SAVE_MULTIPLES[-1]
        if first * SAVE_MULTIPLES[-1] != s.base_iters or first % s.eval_interval:
            raise ValueError(f"size {s.name}: base_iters / 8 must be a multiple of eval_interval")
    else:
        f_c = chinchilla_flops(count_params(built_model_of_size(s)).activated)
        steps = rsize.first_save_fc * f_c / base_flops_per_step(s)
        first = max(1, round(steps / s.eval_interval)) * s.eval_interval
    return [first * m for m in SAVE_MULTIPLES]


def resolved_size(rsize: ReproSize) -> ExperimentSize:
    """The experiment size with ``base_iters`` = the last save."""
    return dataclasses.replace(rsize.size, base_iters=save_iterations(rsize)[-1])


# ------------------------------------------------------------------------------------------------
# The plan of one seed: recipes and the ordered list of runs


def depth_growth(mode: str, seed: int) -> dict:
    return {"order": ["depth"], "depth": {"mode": mode, "factor": 2}, "seed": seed}


def width_growth(alpha: float, seed: int) -> dict:
    return {"order": ["width"], "width": {"factor": 2, "noise": "gaussian", "alpha": alpha}, "seed": seed}


def full_growth(seed: int) -> dict:
    return dict(demo.GROWTH, seed=seed)  # the paper's recipe: depth interposition x2, then width x2


class _Plan:
    """Writes every recipe of one seed and collects its ordered runs and their metadata."""

    def __init__(self, seed_dir: str, size: ExperimentSize, ranks: int, data: dict, seed: int, scored: str):
        self.size, self.seed, self.scored = size, seed, scored
        self.runs_dir = os.path.join(seed_dir, "runs")
        self.recipe_dir = os.path.join(seed_dir, "recipes")
        self.common = common_sections(size, ranks, data)
        self.common["data"]["eval_seed"] = EVAL_SEED
        self.training = training_section(size, seed=seed)
        self.base_model = base_model_section(size)
        self.base_dir = os.path.join(self.runs_dir, "base")
        self.steps, self.meta = [], {}

    def _add(self, name: str, step: dict, model, from_iter: int | None, growth: dict | None, in_a: bool) -> None:
        step["downstream"] = self.scored == "all" or (self.scored == "a" and in_a)
        self.steps.append(dict(step, name=name))
        self.meta[name] = {"model": model, "from_iteration": from_iter, "growth": growth}

    def base(self, save_interval: int) -> None:
        raw = dict(self.common, model=self.base_model, training=dict(self.training, train_iters=self.size.base_iters),
                   checkpoint={"save": self.base_dir, "load": self.base_dir, "save_interval": save_interval,
                               "keep_last": SAVE_MULTIPLES[-1]})  # every save up to 8i is kept
        recipe, path = write_recipe(self.recipe_dir, "base", raw)
        self._add("base", {"kind": "train", "recipe": path, "final": self.base_dir}, recipe.model, None, None, False)

    def grown(self, name: str, growth: dict, from_iter: int, in_a: bool = False):
        """A growth of the base save at ``from_iter`` into runs/NAME_init, then training into runs/NAME."""
        init, final = os.path.join(self.runs_dir, name + "_init"), os.path.join(self.runs_dir, name)
        raw = dict(self.common, model=self.base_model, growth=growth,
                   training=dict(self.training, train_iters=from_iter + self.size.grown_iters),
                   checkpoint={"load": init, "save": final, "save_interval": self.size.grown_iters, "keep_last": 1})
        recipe, path = write_recipe(self.recipe_dir, name, raw)
        model = built_model(recipe)
        self._add(name, {"kind": "grow_train", "recipe": path, "source": paths.iteration_dir(self.base_dir, from_iter),
                         "grown": init, "final": final}, model, from_iter, growth, in_a)
        return model

    def scratch(self, name: str, target) -> None:
        final = os.path.join(self.runs_dir, name)
        raw = dict(self.common, model=scratch_model_section(target),
                   training=dict(self.training, train_iters=self.size.grown_iters),
                   checkpoint={"save": final, "load": None, "save_interval": self.size.grown_iters, "keep_last": 1})
        _, path = write_recipe(self.recipe_dir, name, raw)
        self._add(name, {"kind": "train", "recipe": path, "final": final}, target, 0, None, True)


def build_plan(seed_dir: str, rsize: ReproSize, ranks: int, data: dict, seed: int) -> tuple[list, dict]:
    """Write every recipe of one seed; return (steps for :func:`repro_body`, {run name: metadata})."""
    size = resolved_size(rsize)
    plan = _Plan(seed_dir, size, ranks, data, seed, rsize.downstream)
    saves = save_iterations(rsize)
    first, last = saves[0], saves[-1]
    want = set(rsize.findings)
    plan.base(save_interval=first)
    depth_target = None
    for it in saves:
        ends = it in (first, last)
        if "d" in want or (ends and "b" in want) or (it == last and "a" in want):
            depth_target = plan.grown(f"interposition_at_{it}", depth_growth("interposition", seed), it,
                                      in_a=it == last)
        if ends and "b" in want:
            plan.grown(f"stack_at_{it}", depth_growth("stack", seed), it)
    if want & {"a", "d"}:
        plan.scratch("scratch_depth", depth_target)
    if "c" in want:
        for alpha in ALPHAS:
            plan.grown(f"width_alpha_{alpha:g}", width_growth(alpha, seed), last)
    if "a" in want and rsize.full_recipe:
        plan.scratch("scratch_full", plan.grown("full", full_growth(seed), last, in_a=True))
    return plan.steps, plan.meta


# ------------------------------------------------------------------------------------------------
# The body run on every rank of one seed (module level, so that spawned processes can import it)


def repro_body(steps: list, tokenizer_model: str, downstream_limit: int | None) -> dict:
    """Every run of one seed's plan, in order, in the same processes: ``train`` (the resume-aware
    training body) or ``grow_train`` (``grow_checkpoint`` into a fresh directory, then training),
    then, on rank 0, the downstream score of the final checkpoint when the step asks for it."""
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
        if step["downstream"] and torch.distributed.get_rank() == 0:
            result["downstream"] = downstream_score(step["final"], tokenizer_model, downstream_limit)
        out[step["name"]] = result
    return out


def downstream_score(checkpoint: str, tokenizer_model: str, limit: int | None) -> dict:
    """``megatron-grow eval --load CHECKPOINT --tasks kjv_cloze`` (lm-eval on the exported model)."""
    from megatron_grow.interop.evaluate import evaluate_checkpoint  # lm-eval: imported only when scoring

    t0 = time.perf_counter()
    scores = evaluate_checkpoint(checkpoint, [DOWNSTREAM_TASK], tokenizer=tokenizer_model, limit=limit,
                                 progress=False)
    out = {"task": DOWNSTREAM_TASK, "seconds": round(time.perf_counter() - t0, 1)}
    for s in scores:
        out[s.metric], out[s.metric + "_stderr"], out["samples"] = s.value, s.stderr, s.samples
    return out


# ------------------------------------------------------------------------------------------------
# Orchestration


@dataclass(frozen=True)
class SeedPlan:
    seed: int
    steps: list
    meta: dict


def plan_all(workdir: str, rsize: ReproSize, ranks: int, data: dict, seeds: Sequence[int]) -> list[SeedPlan]:
    """Every seed's recipes (validated before anything trains) under WORKDIR/seed_<seed>/."""
    plans = []
    for seed in seeds:
        steps, meta = build_plan(os.path.join(workdir, f"seed_{seed}"), rsize, ranks, data, seed)
        plans.append(SeedPlan(seed, steps, meta))
    return plans


def _run_seed(plan: SeedPlan, ranks: int, data: dict, limit: int | None) -> dict:
    t0 = time.perf_counter()
    _say(f"seed {plan.seed}: {len(plan.steps)} runs in one set of {ranks} process(es)")
    results = spawn(repro_body, ranks, (plan.steps, data["tokenizer_model"], limit), timeout=12 * 3600.0,
                    filter_warnings=False)  # run_seeds sets the filter once for every seed
    for name, r in results.items():
        check_run(f"seed {plan.seed} {name}", r)
    _say(f"seed {plan.seed}: done in {time.perf_counter() - t0:.0f}s")
    return results


def run_seeds(plans: list[SeedPlan], ranks: int, jobs: int, data: dict, limit: int | None) -> dict:
    """Every seed's runs, ``jobs`` seeds at a time; {seed: {run name: result}}."""
    with library_warnings_ignored(), concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {p.seed: pool.submit(_run_seed, p, ranks, data, limit) for p in plans}
        return {seed: f.result() for seed, f in futures.items()}


def default_jobs(rsize: ReproSize, ranks: int, seeds: Sequence[int]) -> int:
    cores = os.cpu_count() or 1
    if torch.cuda.is_available():
        return 1
    return max(1, min(len(seeds), cores // ranks))


def _checked_size(size: str, tiny: bool, downstream: bool) -> ReproSize:
    rsize = choose_size(size, tiny)
    if not downstream:
        return dataclasses.replace(rsize, downstream="none")
    if rsize.downstream != "none" and importlib.util.find_spec("lm_eval") is None:
        raise UserInputError("scoring the final checkpoints needs lm-eval: pip install -e '.[hf]', or pass "
                          "--no-downstream")
    return rsize


def _train_all(workdir: str, plans: list[SeedPlan], ranks: int, jobs: int, data: dict, rsize: ReproSize) -> dict:
    """Every seed's runs from scratch; the raw results also go to WORKDIR/raw_results.json (what
    ``report_only`` reads back)."""
    for p in plans:
        shutil.rmtree(os.path.join(workdir, f"seed_{p.seed}", "runs"), ignore_errors=True)  # data is reused
    load, t0 = load_average(), time.perf_counter()
    results = run_seeds(plans, ranks, jobs, data, rsize.downstream_limit)
    raw = {"results": {str(seed): r for seed, r in results.items()}, "runs_seconds": time.perf_counter() - t0,
           "data_seconds": data["seconds"], "load_average_start": load, "load_average_end": load_average()}
    write_json(os.path.join(workdir, "raw_results.json"), raw)
    return raw


def _read_raw(workdir: str, plans: list[SeedPlan]) -> dict:
    path = os.path.join(workdir, "raw_results.json")
    if not os.path.isfile(path):
        raise UserInputError(f"--report-only: {path} does not exist (run the reproduction first)")
    with open(path) as f:
        raw = json.load(f)
    missing = [p.seed for p in plans if str(p.seed) not in raw["results"]]
    if missing:
        raise UserInputError(f"--report-only: {path} has no results for seed(s) {missing}")
    return raw


def run_repro(workdir: str = "runs/repro", size: str = "auto", tiny: bool = False, ranks: int | None = None,
              texts: Sequence[str] | None = None, seeds: Sequence[int] | None = None, jobs: int | None = None,
              dry_run: bool = False, downstream: bool = True, report_only: bool = False) -> dict:
    """Every run of the four findings for every seed; returns the summary also written to WORKDIR/results.json.
    ``dry_run``: write and validate every recipe, print the plan, train nothing. ``report_only``: rebuild
    the tables and plots from WORKDIR/raw_results.json, train nothing."""
    t_start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    rsize = _checked_size(size, tiny, downstream)
    ranks = ranks or (torch.cuda.device_count() if torch.cuda.is_available() else rsize.ranks)
    seeds = list(seeds or rsize.seeds)
    jobs = jobs or default_jobs(rsize, ranks, seeds)
    texts = resolve_texts(texts)
    _say(f"size {rsize.size.name}, seeds {seeds}, {ranks} rank(s) per seed, {jobs} seed(s) at a time, "
         f"workdir {workdir}; load average {load_average()}")
    data = prepare_data(workdir, texts, rsize.size.vocab_size, say=_say)
    plans = plan_all(workdir, rsize, ranks, data, seeds)
    _say_plan(rsize, plans[0])
    if dry_run:
        _say(f"dry run: {sum(len(p.steps) for p in plans)} recipes written under {workdir}/seed_*/recipes; "
             "nothing trained")
        return {"dry_run": True, "plans": [dataclasses.asdict(p) for p in plans]}
    raw = _read_raw(workdir, plans) if report_only else _train_all(workdir, plans, ranks, jobs, data, rsize)
    per_seed = [summarize_seed(resolved_size(rsize), p.meta, raw["results"][str(p.seed)], save_iterations(rsize),
                               p.seed, rsize.findings) for p in plans]
    summary = _summary(rsize, ranks, jobs, texts, data, per_seed)
    # Data preparation and the runs (with --report-only: those of the run being reported).
    summary["timings_s"] = {"data": round(raw["data_seconds"], 1), "runs": round(raw["runs_seconds"], 1),
                            "total": round(raw["data_seconds"] + raw["runs_seconds"], 1)}
    summary["load_average_start"], summary["load_average_end"] = raw["load_average_start"], raw["load_average_end"]
    _write_outputs(workdir, summary)
    _say(f"done in {time.perf_counter() - t_start:.0f}s (load average at the end {load_average()})")
    return summary


def _summary(rsize: ReproSize, ranks: int, jobs: int, texts, data: dict, per_seed: list) -> dict:
    size = resolved_size(rsize)
    return {
        "size": dataclasses.asdict(size), "first_save_fc": rsize.first_save_fc, "ranks": ranks, "jobs": jobs,
        "findings": list(rsize.findings),
        "seeds": [s["seed"] for s in per_seed], "texts": texts,
        "dataset": {"prefix": data["prefix"], "tokenizer_model": data["tokenizer_model"]},
        "validation": {"samples": size.eval_samples, "eval_seed": EVAL_SEED,
                       "tokens_sha256": check_same_validation_everywhere(per_seed)},
        "downstream": {"task": DOWNSTREAM_TASK, "runs": rsize.downstream, "limit": rsize.downstream_limit},
        "per_seed": per_seed, "aggregate": aggregate(per_seed),
    }


def _say_plan(rsize: ReproSize, plan: SeedPlan) -> None:
    size = resolved_size(rsize)
    n_a = count_params(plan.meta["base"]["model"]).activated
    f_c, per_step = chinchilla_flops(n_a), base_flops_per_step(size)
    saves = save_iterations(rsize)
    _say(f"base: {size.num_layers}L {size.num_moe_experts}E top-{size.moe_router_topk}, N_a {n_a:,}, "
         f"F_c {f_c:.3e}; saves at iterations {saves} = "
         + ", ".join(f"{it * per_step / f_c:.2f}" for it in saves) + " F_c")
    _say(f"runs per seed ({len(plan.steps)}): " + ", ".join(s["name"] for s in plan.steps)
         + f"; {size.grown_iters} steps each after growth")


def _write_outputs(workdir: str, summary: dict) -> None:
    summary["plots"] = write_plots(summary, workdir)
    md = format_markdown(summary)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(md + "\n")
    write_json(os.path.join(workdir, "results.json"), summary)
    print(md, flush=True)
    _say(f"wrote {os.path.join(workdir, 'results.md')}, results.json and {len(summary['plots'])} plots")
