"""The paper's four findings (arXiv 2510.08008), their controls and the growth options, at a scale we
can run, over seeds; docs/results.md is the measured study.

    megatron-grow repro --size cpu --jobs 3    # 5 seeds, 3 side by side on 2 CPU cores
    megatron-grow repro --tiny                 # CI: the machinery, not the science (~6 minutes)
    megatron-grow repro --size gpu --dry-run   # one GPU: the plan and its estimated time
    megatron-grow repro --report-only --raw docs/results/repro_cpu --report-dir docs

For every seed (init, training data order and growth noise; the validation tokens stay fixed), one
base MoE (routed experts most of its parameters and FLOPs, top-2) trains with a linear warmup then a
constant LR (the paper's base) and is saved at four iterations i, 2i, 4i, 8i, i the evaluation
nearest 0.25 F_c (F_c = 120 N_a^2), so near 0.25, 0.5, 1 and 2 F_c. Every later run trains
``grown_iters`` steps with the same batch; grown runs restart at the constant LR with no warmup,
scratch runs have their own warmup:

(a) depth interposition x2 of the last save vs the same architecture from scratch (equal additional
    FLOPs), and vs the base trained on from that save ("continue_base", at least those FLOPs; compared
    on its curve at the grown run's budget);
(b) interposition vs stack (depth x2) from the first and the last save, with the base's weight-norm
    profile at every save (``analysis.weight_norms``);
(c) width growth (experts x2, top-k x2: function-preserving with top-2) with alpha 0 and 0.01;
(d) final loss vs sunk cost: depth interposition from every save, and sunk cost 0 (scratch);
ops: against width x2 alpha 0.01 from the last save: top-k fixed (uniform width; upcycle by each
    layer's routing share, measured by route-stats on that save), Adam moments carried and the best
    moment policy, and an LR re-warmup.

Each seed's runs share one set of processes (``run_in_processes``); seeds run side by side (``jobs``),
and each seed's raw record (every evaluation point, counters, validation digest, recipes, seed,
per-question downstream outcomes, norm profiles) is written to WORKDIR/raw/seed_<seed>.json when it
ends, next to WORKDIR/raw/study.json. The report is built from those records alone
(:func:`summarize_study`), so ``--report-only`` rebuilds it byte for byte. Numbers per seed:
:mod:`~megatron_grow.experiments.repro_summary`; statistics over seeds:
:mod:`~megatron_grow.experiments.repro_stats`; page and plots: :mod:`~megatron_grow.experiments.repro_report`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.transformer.moe import moe_utils

from megatron_grow.analysis.weight_norms import norm_profile
from megatron_grow.checkpoint import paths
from megatron_grow.config.check import built_model
from megatron_grow.config.loader import load_recipe, recipe_to_dict
from megatron_grow.data.heldout import write_training_text
from megatron_grow.errors import UserInputError
from megatron_grow.experiments.common import (
    REPO_CORPUS,
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
    write_recipe_file,
)
from megatron_grow.experiments.repro_report import format_markdown, write_plots
from megatron_grow.experiments.repro_stats import accuracy_errors, aggregate, mean_se
from megatron_grow.experiments.repro_summary import ALPHAS, check_same_validation_everywhere, summarize_seed
from megatron_grow.growth.route_stats import route_stats, write_stats
from megatron_grow.log import component_log
from megatron_grow.models.params import count_params
from megatron_grow.training.flops import chinchilla_flops, training_flops_per_step, training_flops_per_token

SAVE_MULTIPLES = (1, 2, 4, 8)  # base saves at i, 2i, 4i, 8i
EVAL_SEED = 4321  # the validation sample order: the same tokens for every run of every seed
DOWNSTREAM_TASK = "kjv_heldout_cloze"  # verses of whole books held out of the training text (data/heldout.py)
# SPARKLING's asymmetric reset (docs/growth.md "Optimizer state by policy"): the best of the moment
# policies in benchmarks/growth_policies.py (docs/results/growth_policies.json) at +10 and +50 steps.
BEST_MOMENT_POLICY = {"originals": {"exp_avg": "copy", "exp_avg_sq": "copy"},
                      "copies": {"exp_avg": "reset", "exp_avg_sq": "copy"}}
RAW_FORMAT = "megatron-grow-repro-raw/1"
ROUTE_STATS_TOKENS = 16384  # calibration tokens for the upcycle's utility (route-stats of the last save)


@dataclass(frozen=True)
class ReproSize:
    """A scale of the reproduction: the architecture, batch and schedule, and what runs at it."""

    size: ExperimentSize          # base_iters is used only when first_save_fc is None
    first_save_fc: float | None   # the first base save at this multiple of F_c (None: base_iters / 8)
    seeds: tuple[int, ...]
    warmup_iters: int             # linear warmup of the base and of every scratch run, then constant LR
    rewarmup_iters: int           # the re-warmup arm's linear warmup after growth (every other grown run: none)
    downstream: str               # which final checkpoints are scored: "all", "key" (KEY_RUNS), "none"
    downstream_limit: int | None  # questions per evaluation (None: the whole task)
    ranks: int                    # processes per seed on CPU (on a GPU: one per device)
    findings: tuple[str, ...] = ("a", "b", "c", "d", "ops")  # which findings' runs to train ("ops": comparisons)


SIZES = {
    # CI: checks the machinery (FLOPs bookkeeping, equal budgets, validation tokens, statistics, report),
    # not the science: the base sees ~0.03 F_c. seq 64 so that the downstream answers fit.
    "tiny": ReproSize(ExperimentSize("tiny", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                     kv_channels=8, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                                     seq_length=64, micro_batch_size=8, global_batch_size=16, base_iters=32,
                                     grown_iters=8, eval_interval=4, eval_iters=2, lr=3e-3, vocab_size=256),
                      first_save_fc=None, seeds=(1234, 1235), warmup_iters=2, rewarmup_iters=2, downstream="key",
                      downstream_limit=40, ranks=2),
    # CPU: 4 layers, 8 experts of FFN 96, top-2, hidden 16, vocabulary 256: the routed experts are 92 % of the
    # parameters and 61 % of the training FLOPs (LM head 7 %). Sequences of 128 tokens, so that the held-out
    # questions (context + answer up to ~140 tokens at this vocabulary) are seldom cut; batch 32 x 128 tokens,
    # F_c = 120 N_a^2 is ~190 steps (saves at 50, 100, 200, 400); the base to ~2 F_c (one pass over the text).
    "cpu": ReproSize(ExperimentSize("cpu", num_layers=4, hidden_size=16, num_attention_heads=2, num_query_groups=1,
                                    kv_channels=8, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=96,
                                    seq_length=128, micro_batch_size=32, global_batch_size=32, base_iters=0,
                                    grown_iters=150, eval_interval=25, eval_iters=8, lr=3e-3, vocab_size=256),
                     first_save_fc=0.25, seeds=(1234, 1235, 1236, 1237, 1238), warmup_iters=20, rewarmup_iters=16,
                     downstream="key", downstream_limit=None, ranks=1),
    # One GPU (H200): 4 layers, 16 experts of FFN 512, top-2, hidden 128, vocabulary 1024 (experts 96 % of the
    # parameters, 72 % of the FLOPs); batch 256 x 256 tokens. Dry-run tested (the plan's time is an estimate under
    # GPU_ASSUMPTIONS); never run in this repository.
    "gpu": ReproSize(ExperimentSize("gpu", num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                                    kv_channels=32, num_moe_experts=16, moe_router_topk=2, moe_ffn_hidden_size=512,
                                    seq_length=256, micro_batch_size=256, global_batch_size=256, base_iters=0,
                                    grown_iters=250, eval_interval=50, eval_iters=4, lr=2e-3, vocab_size=1024),
                     first_save_fc=0.25, seeds=(1234, 1235, 1236), warmup_iters=50, rewarmup_iters=25,
                     downstream="key", downstream_limit=None, ranks=1),
}


# What the GPU plan's time estimate assumes (not measured: no GPU in this project's sessions): H200 dense
# bf16 peak, a model-FLOPs utilisation typical of small models, and a fixed cost per optimizer step.
GPU_ASSUMPTIONS = {"peak_flops": 989e12, "mfu": 0.2, "step_overhead_s": 0.05, "downstream_s": 30.0}

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


def width_growth(alpha: float, seed: int, topk_factor: int | None = None, optimizer: str = "reset") -> dict:
    """Experts x2 with gaussian noise of scale alpha; top-k x2 (function-preserving with top-k >= 2 and
    normalised sigmoid routing, docs/growth.md) unless ``topk_factor`` 1 keeps it."""
    growth = {"order": ["width"], "width": {"factor": 2, "topk_factor": topk_factor, "noise": "gaussian",
                                            "alpha": alpha}, "seed": seed, "optimizer": optimizer}
    if optimizer == "policy":
        growth["optimizer_policy"] = BEST_MOMENT_POLICY
    return growth


def upcycle_growth(num_experts: int, seed: int, utility_stats: str | None) -> dict:
    """Expert upcycling E -> 2E, top-k fixed, copies by each layer's routing share; the copies start
    unselected, so the grown model computes the source's function exactly."""
    section = {"num_experts": num_experts, "allocation": "utility", "unselected_copies": True}
    if utility_stats is None:  # plan-time validation, before route-stats has written the file
        section["utility_shares"] = [1.0] * (num_experts // 2)
    else:
        section["utility_stats"] = utility_stats
    return {"order": ["upcycle"], "upcycle": section, "seed": seed}


# Which runs are scored downstream with downstream="key": the runs of the accuracy rows of (a), (c), (d).
def key_runs(saves: list) -> set:
    return {f"interposition_at_{saves[0]}", f"interposition_at_{saves[-1]}", "scratch_depth", "continue_base",
            "width_alpha_0", "width_alpha_0.01"}


class _Plan:
    """Writes every recipe of one seed and collects its ordered runs and their metadata."""

    def __init__(self, seed_dir: str, rsize: ReproSize, ranks: int, data: dict, seed: int):
        self.rsize, self.size, self.seed = rsize, resolved_size(rsize), seed
        self.saves = save_iterations(rsize)
        self.scored = (lambda name: True) if rsize.downstream == "all" else \
            (lambda name: rsize.downstream == "key" and name in key_runs(self.saves))
        self.runs_dir = os.path.join(seed_dir, "runs")
        self.recipe_dir = os.path.join(seed_dir, "recipes")
        self.common = common_sections(self.size, ranks, data)
        self.common["data"]["eval_seed"] = EVAL_SEED
        # Warmup then constant LR (the paper's base, docs/paper.md §5); a grown run restarts its schedule at
        # the growth step with no warmup (the paper's grown models continue at a constant LR).
        self.training = dict(training_section(self.size, seed=seed), lr_warmup_iters=rsize.warmup_iters,
                             lr_rewarmup_iters=0)
        self.base_model = base_model_section(self.size)
        self.base_dir = os.path.join(self.runs_dir, "base")
        self.steps, self.meta = [], {}

    def _add(self, name: str, step: dict, model, from_iter: int | None, growth: dict | None, raw: dict) -> None:
        step["downstream"] = self.scored(name)
        self.steps.append(dict(step, name=name))
        self.meta[name] = {"model": model, "from_iteration": from_iter, "growth": growth, "recipe": raw}

    def base(self) -> None:
        raw = dict(self.common, model=self.base_model, training=dict(self.training, train_iters=self.size.base_iters),
                   checkpoint={"save": self.base_dir, "load": self.base_dir, "save_interval": self.saves[0],
                               "keep_last": SAVE_MULTIPLES[-1]})  # every save up to 8i is kept
        recipe, path = write_recipe(self.recipe_dir, "base", raw)
        self._add("base", {"kind": "train", "recipe": path, "final": self.base_dir,
                           "norm_profiles": [paths.iteration_dir(self.base_dir, it) for it in self.saves]},
                  recipe.model, None, None, raw)

    def grown(self, name: str, growth: dict, from_iter: int, training: dict | None = None, check: dict | None = None):
        """A growth of the base save at ``from_iter`` into runs/NAME_init, then training into runs/NAME.
        ``check``: the growth section validated in place of ``growth`` (a file not written yet)."""
        init, final = os.path.join(self.runs_dir, name + "_init"), os.path.join(self.runs_dir, name)
        raw = dict(self.common, model=self.base_model, growth=growth,
                   training=dict(self.training, train_iters=from_iter + self.size.grown_iters, **(training or {})),
                   checkpoint={"load": init, "save": final, "save_interval": self.size.grown_iters, "keep_last": 1})
        recipe, path = write_recipe(self.recipe_dir, name, dict(raw, growth=check or growth))
        if check is not None:
            write_recipe_file(path, raw)
        model = built_model(recipe)
        self._add(name, {"kind": "grow_train", "recipe": path, "source": paths.iteration_dir(self.base_dir, from_iter),
                         "grown": init, "final": final}, model, from_iter, growth, raw)
        return model

    def scratch(self, name: str, target) -> None:
        """``target`` from random init, with its own warmup, for the grown runs' number of steps."""
        final = os.path.join(self.runs_dir, name)
        raw = dict(self.common, model=scratch_model_section(target),
                   training=dict(self.training, train_iters=self.size.grown_iters),
                   checkpoint={"save": final, "load": None, "save_interval": self.size.grown_iters, "keep_last": 1})
        _, path = write_recipe(self.recipe_dir, name, raw)
        self._add(name, {"kind": "train", "recipe": path, "final": final}, target, 0, None, raw)

    def continued(self, name: str, from_iter: int, iters: int) -> None:
        """The base resumed (weights, optimizer, schedule) from its save at ``from_iter`` for ``iters`` steps."""
        init, final = os.path.join(self.runs_dir, name + "_init"), os.path.join(self.runs_dir, name)
        raw = dict(self.common, model=self.base_model, training=dict(self.training, train_iters=from_iter + iters),
                   checkpoint={"save": final, "load": init, "save_interval": iters, "keep_last": 1})
        recipe, path = write_recipe(self.recipe_dir, name, raw)
        self._add(name, {"kind": "train", "recipe": path, "final": final, "copy_save": [
            paths.iteration_dir(self.base_dir, from_iter), init]}, recipe.model, from_iter, None, raw)

    def route_stats(self, from_iter: int) -> str:
        """A step writing the routing shares of the base save at ``from_iter`` (the upcycle's utility)."""
        out = os.path.join(self.runs_dir, f"route_stats_{from_iter}.json")
        self.steps.append({"kind": "route_stats", "name": f"route_stats_{from_iter}",
                           "source": paths.iteration_dir(self.base_dir, from_iter), "out": out,
                           "prefix": self.common["data"]["data_path"][0], "recipe": self.steps[0]["recipe"],
                           "downstream": False})
        return out


def continue_iters(size: ExperimentSize, grown_model) -> int:
    """Steps of the base that spend at least what ``grown_iters`` steps of ``grown_model`` spend (rounded up
    to an evaluation, so that the run ends on one and its curve covers the grown run's budget)."""
    ratio = (training_flops_per_step(grown_model, size.global_batch_size, size.seq_length)
             / base_flops_per_step(size))
    return max(1, math.ceil(size.grown_iters * ratio / size.eval_interval - 1e-9)) * size.eval_interval


def build_plan(seed_dir: str, rsize: ReproSize, ranks: int, data: dict, seed: int) -> tuple[list, dict]:
    """Write every recipe of one seed; return (steps for :func:`repro_body`, {run name: metadata})."""
    plan = _Plan(seed_dir, rsize, ranks, data, seed)
    saves, want = plan.saves, set(rsize.findings)
    first, last = saves[0], saves[-1]
    plan.base()
    depth_target = None
    for it in saves:
        ends = it in (first, last)
        if "d" in want or (ends and "b" in want) or (it == last and "a" in want):
            depth_target = plan.grown(f"interposition_at_{it}", depth_growth("interposition", seed), it)
        if ends and "b" in want:
            plan.grown(f"stack_at_{it}", depth_growth("stack", seed), it)
    if want & {"a", "d"}:
        plan.scratch("scratch_depth", depth_target)
    if "a" in want:
        plan.continued("continue_base", last, continue_iters(plan.size, depth_target))
    if want & {"c", "ops"}:
        for alpha in ALPHAS:
            plan.grown(f"width_alpha_{alpha:g}", width_growth(alpha, seed), last)
    if "ops" in want:
        _comparisons(plan, seed, last)
    return plan.steps, plan.meta


def _comparisons(plan: _Plan, seed: int, last: int) -> None:
    """Top-k fixed (uniform width, upcycle by utility), the moment policies and the LR re-warmup, each
    against width x2 with alpha 0.01 (top-k x2, moments reset, no re-warmup) from the same save."""
    plan.grown("width_topk_fixed", width_growth(0.01, seed, topk_factor=1), last)
    experts = 2 * plan.size.num_moe_experts
    stats = plan.route_stats(last)
    plan.grown("upcycle_utility", upcycle_growth(experts, seed, stats), last, check=upcycle_growth(experts, seed, None))
    plan.grown("width_carry", width_growth(0.01, seed, optimizer="carry"), last)
    plan.grown("width_policy", width_growth(0.01, seed, optimizer="policy"), last)
    plan.grown("width_rewarmup", width_growth(0.01, seed), last,
               training={"lr_rewarmup_iters": plan.rsize.rewarmup_iters})


# ------------------------------------------------------------------------------------------------
# The body run on every rank of one seed (module level, so that spawned processes can import it)


def repro_body(steps: list, tokenizer_model: str, downstream_limit: int | None) -> dict:
    """Every run of one seed's plan, in order, in the same processes: ``train`` (the resume-aware
    training body), ``grow_train`` (``grow_checkpoint`` into a fresh directory, then training) or
    ``route_stats``; then, on rank 0, the downstream score of the final checkpoint when the step asks
    for it, and the weight-norm profile of each base save."""
    out = {}
    for step in steps:
        t0 = time.perf_counter()
        if step["kind"] == "route_stats":
            out[step["name"]] = _route_stats_step(step)
            continue
        # MCore's layer-wise aux-loss tracker is a process global sized by the first model's
        # layer count; a deeper model in the same process would index past it.
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
        grow = None
        if step.get("copy_save"):
            _copy_save(*step["copy_save"])
        if step["kind"] == "grow_train":
            grow = grow_body(step["source"], step["grown"], step["recipe"], verify=False, progress=False)
        result = train_phase_body(step["recipe"])
        if grow is not None:
            result["grow"] = grow
        result["seconds"] = time.perf_counter() - t0
        if torch.distributed.get_rank() == 0:
            if step["downstream"]:
                result["downstream"] = downstream_score(step["final"], tokenizer_model, downstream_limit)
            if step.get("norm_profiles"):
                result["norm_profiles"] = [norm_profile(p).as_dict() for p in step["norm_profiles"]]
        out[step["name"]] = result
    return out


def _copy_save(iter_dir: str, root: str) -> None:
    """The save ``iter_dir`` (weights, optimizer, schedule, RNG) as the only checkpoint of a fresh run
    root, so that a run resumes it without writing into the base's directory."""
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
        iteration = paths.resolve_checkpoint_dir(iter_dir)[1]
        shutil.copytree(iter_dir, paths.iteration_dir(root, iteration))
        paths.write_tracker(root, iteration)
    torch.distributed.barrier()


def _route_stats_step(step: dict) -> dict:
    recipe = load_recipe(step["recipe"])
    stats = route_stats(step["source"], step["prefix"], recipe.parallel, tokens=ROUTE_STATS_TOKENS,
                        seq_length=recipe.model.seq_length, micro_batch=recipe.training.micro_batch_size)
    write_stats(step["out"], stats)
    torch.distributed.barrier()  # every rank grows from the file rank 0 wrote
    return {"kind": "route_stats", "shares": stats["shares"], "tokens": stats["tokens"]}


def downstream_score(checkpoint: str, tokenizer_model: str, limit: int | None) -> dict:
    """``megatron-grow eval --load CHECKPOINT --tasks TASK`` (lm-eval on the exported model), with the
    per-question outcomes (for the question-sampling error)."""
    from megatron_grow.interop.evaluate import evaluate_checkpoint  # lm-eval: imported only when scoring

    t0 = time.perf_counter()
    scores = evaluate_checkpoint(checkpoint, [DOWNSTREAM_TASK], tokenizer=tokenizer_model, limit=limit,
                                 progress=False, per_question=True)
    out = {"task": DOWNSTREAM_TASK, "seconds": round(time.perf_counter() - t0, 1)}
    for s in scores:
        out[s.metric], out[s.metric + "_stderr"], out["samples"] = s.value, s.stderr, s.samples
        out[s.metric + "_per_question"] = list(s.per_question) if s.per_question is not None else None
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


def _run_seed(plan: SeedPlan, ranks: int, data: dict, limit: int | None, raw_dir: str) -> dict:
    t0 = time.perf_counter()
    _say(f"seed {plan.seed}: {len(plan.steps)} steps in one set of {ranks} process(es)")
    results = spawn(repro_body, ranks, (plan.steps, data["tokenizer_model"], limit), timeout=12 * 3600.0,
                    filter_warnings=False)  # run_seeds sets the filter once for every seed
    for name, r in results.items():
        if r.get("kind") != "route_stats":
            check_run(f"seed {plan.seed} {name}", r)
    seconds = time.perf_counter() - t0
    write_json(os.path.join(raw_dir, f"seed_{plan.seed}.json"), raw_seed(plan, results, seconds))
    _say(f"seed {plan.seed}: done in {seconds:.0f}s; raw results in {raw_dir}/seed_{plan.seed}.json")
    return results


def raw_seed(plan: SeedPlan, results: dict, seconds: float) -> dict:
    """One seed's raw record: every run's result (each evaluation point, the validation digest,
    counters, downstream per-item outcomes) and its recipe, model and growth, as plain JSON."""
    meta = {name: {"model": recipe_to_dict(m["model"]), "from_iteration": m["from_iteration"],
                   "growth": m["growth"], "recipe": m["recipe"]} for name, m in plan.meta.items()}
    return {"format": RAW_FORMAT, "seed": plan.seed, "seconds": round(seconds, 1), "meta": meta, "results": results}


def run_seeds(plans: list[SeedPlan], ranks: int, jobs: int, data: dict, limit: int | None, raw_dir: str) -> dict:
    """Every seed's runs, ``jobs`` seeds at a time; {seed: {run name: result}}."""
    with library_warnings_ignored(), concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {p.seed: pool.submit(_run_seed, p, ranks, data, limit, raw_dir) for p in plans}
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


def _train_all(workdir: str, plans: list[SeedPlan], ranks: int, jobs: int, data: dict, rsize: ReproSize,
               study: dict) -> None:
    """Every seed's runs from scratch; the raw results go to WORKDIR/raw/ (seed_<seed>.json as each seed
    ends, then study.json): what ``--report-only`` reads back."""
    raw_dir = os.path.join(workdir, "raw")
    shutil.rmtree(raw_dir, ignore_errors=True)
    os.makedirs(raw_dir)
    for p in plans:
        shutil.rmtree(os.path.join(workdir, f"seed_{p.seed}", "runs"), ignore_errors=True)  # data is reused
    load, t0 = load_average(), time.perf_counter()
    write_json(os.path.join(raw_dir, "study.json"), dict(study, complete=False))
    run_seeds(plans, ranks, jobs, data, rsize.downstream_limit, raw_dir)
    study = dict(study, complete=True, runs_seconds=round(time.perf_counter() - t0, 1),
                 load_average_start=load, load_average_end=load_average())
    write_json(os.path.join(raw_dir, "study.json"), study)


def read_raw(raw_dir: str) -> tuple[dict, list[dict]]:
    """(study.json, [seed_<seed>.json ...] in the study's seed order, the seeds present); UserInputError
    naming the directory when it holds no study or no seed."""
    path = os.path.join(raw_dir, "study.json")
    if not os.path.isfile(path):
        raise UserInputError(f"--report-only: {path} does not exist (run the reproduction first)")
    with open(path) as f:
        study = json.load(f)
    seeds = []
    for seed in study["seeds"]:
        seed_path = os.path.join(raw_dir, f"seed_{seed}.json")
        if os.path.isfile(seed_path):
            with open(seed_path) as f:
                seeds.append(json.load(f))
    if not seeds:
        raise UserInputError(f"--report-only: {raw_dir} has no seed_<seed>.json for seeds {study['seeds']}")
    return study, seeds


def estimated_gpu_seconds(rsize: ReproSize, plans: list[SeedPlan]) -> dict:
    """The plan's time on one GPU under GPU_ASSUMPTIONS: per optimizer step a fixed cost plus its FLOPs at
    ``mfu`` x ``peak_flops``; per downstream score ``downstream_s``. Evaluations are not counted."""
    size, a = resolved_size(rsize), GPU_ASSUMPTIONS
    steps = flops = seconds = 0.0
    scored = 0
    for plan in plans:
        for step in plan.steps:
            if step["name"] not in plan.meta:
                continue
            m = plan.meta[step["name"]]
            n = m["recipe"]["training"]["train_iters"] - (m["from_iteration"] or 0)
            per_step = training_flops_per_step(m["model"], size.global_batch_size, size.seq_length)
            steps, flops = steps + n, flops + n * per_step
            seconds += n * (a["step_overhead_s"] + per_step / (a["mfu"] * a["peak_flops"]))
            scored += step["downstream"]
    return {"steps": int(steps), "flops": flops, "scored": scored,
            "seconds": seconds + scored * a["downstream_s"]}


def _study_record(rsize: ReproSize, ranks: int, jobs: int, texts, data: dict, seeds: list, heldout) -> dict:
    size = resolved_size(rsize)
    return {"format": RAW_FORMAT, "size": dataclasses.asdict(size), "repro_size": {
                k: v for k, v in dataclasses.asdict(rsize).items() if k != "size"},
            "save_iterations": save_iterations(rsize), "ranks": ranks, "jobs": jobs, "seeds": list(seeds),
            "texts": [os.path.basename(t) for t in texts], "heldout": heldout,
            "downstream": {"task": DOWNSTREAM_TASK, "runs": rsize.downstream, "limit": rsize.downstream_limit},
            "validation": {"samples": size.eval_samples, "eval_seed": EVAL_SEED},
            "train_tokens": dataset_tokens(data["prefix"]), "data_seconds": round(data["seconds"], 1),
            "command": "megatron-grow repro " + " ".join(
                ["--tiny"] if size.name == "tiny" else ["--size", size.name])}


def dataset_tokens(prefix: str) -> int:
    """Tokens in the indexed dataset at ``prefix`` (all splits)."""
    dataset = IndexedDataset(prefix)  # held while summing: its lengths are a view of its memory map
    return int(dataset.sequence_lengths.sum())


def training_texts(workdir: str, texts: Sequence[str] | None) -> tuple[list[str], dict | None]:
    """The corpus to train on: by default the shipped KJV without the books the downstream task is
    drawn from (``data.heldout``), so no run has seen its questions; user texts as given (then the
    held-out guarantee does not hold, and the study records ``heldout: None``)."""
    if texts:
        return resolve_texts(texts), None
    out = os.path.join(workdir, "data", "kjv_train.txt.gz")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    info = write_training_text(REPO_CORPUS, out)
    return [out], {k: v for k, v in info.items() if k != "path"}


def run_repro(workdir: str = "runs/repro", size: str = "auto", tiny: bool = False, ranks: int | None = None,
              texts: Sequence[str] | None = None, seeds: Sequence[int] | None = None, jobs: int | None = None,
              dry_run: bool = False, downstream: bool = True, report_only: bool = False,
              raw_dir: str | None = None, report_dir: str | None = None) -> dict:
    """Every run of the study for every seed; returns the summary REPORT_DIR/results.md (default: WORKDIR)
    is written from. ``dry_run``: write and validate every recipe, print the plan, train nothing.
    ``report_only``: rebuild the report and plots from RAW_DIR (default WORKDIR/raw), train nothing."""
    t_start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    report_dir = os.path.abspath(report_dir or workdir)
    if report_only:
        raw_dir = raw_dir or os.path.join(workdir, "raw")
        study, seeds_raw = read_raw(raw_dir)
        summary = summarize_study(study, seeds_raw, _label(raw_dir), read_notes(raw_dir))
        _write_outputs(report_dir, summary)
        return summary
    os.makedirs(workdir, exist_ok=True)
    rsize = _checked_size(size, tiny, downstream)
    ranks = ranks or (torch.cuda.device_count() if torch.cuda.is_available() else rsize.ranks)
    seeds = list(seeds or rsize.seeds)
    jobs = jobs or default_jobs(rsize, ranks, seeds)
    texts, heldout = training_texts(workdir, texts)
    _say(f"size {rsize.size.name}, seeds {seeds}, {ranks} rank(s) per seed, {jobs} seed(s) at a time, "
         f"workdir {workdir}; load average {load_average()}")
    data = prepare_data(workdir, texts, rsize.size.vocab_size, say=_say)
    plans = plan_all(workdir, rsize, ranks, data, seeds)
    _say_plan(rsize, plans[0], dataset_tokens(data["prefix"]))
    if dry_run:
        estimate = estimated_gpu_seconds(rsize, plans)
        _say(f"dry run: {sum(len(p.steps) for p in plans)} steps written under {workdir}/seed_*/recipes; "
             f"nothing trained. On one GPU, under GPU_ASSUMPTIONS {GPU_ASSUMPTIONS}: about "
             f"{estimate['seconds'] / 60:.0f} min ({estimate['steps']:,} optimizer steps, "
             f"{estimate['flops']:.3e} training FLOPs, {estimate['scored']} downstream scores)")
        return {"dry_run": True, "plans": [dataclasses.asdict(p) for p in plans], "gpu_estimate": estimate}
    study = _study_record(rsize, ranks, jobs, texts, data, seeds, heldout)
    _train_all(workdir, plans, ranks, jobs, data, rsize, study)
    study, seeds_raw = read_raw(os.path.join(workdir, "raw"))
    summary = summarize_study(study, seeds_raw, _label(os.path.join(workdir, "raw")))
    _write_outputs(report_dir, summary)
    _say(f"done in {time.perf_counter() - t_start:.0f}s (load average at the end {load_average()})")
    return summary


def summarize_study(study: dict, seeds_raw: list[dict], raw_dir_label: str, notes: str | None = None) -> dict:
    """The report's input from the raw records alone: per seed, the runs and findings; over seeds, the
    statistics; the design's shares; the base's weight-norm profiles."""
    size = ExperimentSize(**study["size"])
    findings = tuple(study["repro_size"]["findings"])
    per_seed, metas = [], []
    for rec in seeds_raw:
        meta = {name: dict(m, model=load_recipe(raw={"model": m["model"]}).model) for name, m in rec["meta"].items()}
        metas.append(meta)
        per_seed.append(summarize_seed(size, meta, rec["results"], study["save_iterations"], rec["seed"], findings))
    return {"study": study, "raw_dir_label": raw_dir_label, "seeds": [s["seed"] for s in per_seed],
            "validation_tokens_sha256": check_same_validation_everywhere(per_seed),
            "design": design_numbers(study, metas[0], seeds_raw[0]["results"]), "per_seed": per_seed,
            "aggregate": aggregate(per_seed),
            "question_se": question_errors(per_seed), "norm_profiles": norm_profile_stats(per_seed),
            "seed_seconds": [{"seed": rec["seed"], "seconds": rec["seconds"]} for rec in seeds_raw], "notes": notes}


def design_numbers(study: dict, meta: dict, results: dict) -> dict:
    """Parameter, activated-parameter and FLOP shares of the base (experts vs attention vs embeddings vs
    head), and the numbers the design section quotes."""
    size, model = study["size"], meta["base"]["model"]
    p = count_params(model)
    flops = training_flops_per_token(model, size["seq_length"])
    rest = p.total - p.expert - p.embedding - p.output_layer
    active_experts = p.activated - p.non_expert
    tokens = study.get("train_tokens")
    scored = [r["downstream"]["samples"] for r in results.values() if r.get("downstream")]
    return {
        "params_total": p.total,
        "shares": {
            "params": {"experts": p.expert / p.total, "attention": rest / p.total,
                       "embedding": p.embedding / p.total, "lm_head": p.output_layer / p.total},
            "activated": {"experts": active_experts / p.activated, "attention": rest / p.activated,
                          "embedding": p.embedding / p.activated, "lm_head": p.output_layer / p.activated},
            "flops": {"experts": flops.experts / flops.total, "lm_head": flops.lm_head / flops.total,
                      "attention": (flops.total - flops.experts - flops.lm_head) / flops.total}},
        "continue_iters": (meta["continue_base"]["recipe"]["training"]["train_iters"]
                           - meta["continue_base"]["from_iteration"]) if "continue_base" in meta else None,
        "train_epochs_base": (size["base_iters"] * size["global_batch_size"] * size["seq_length"] / tokens
                              if tokens else float("nan")),
        "questions": scored[0] if scored else None,
    }


def question_errors(per_seed: list) -> dict:
    """Per scored run: the question-sampling SE of its accuracy (per-question outcomes averaged over seeds)."""
    out = {}
    for name in per_seed[0]["runs"]:
        items = [((s["runs"][name].get("downstream") or {}).get("acc_per_question")) for s in per_seed]
        if all(items):
            out[name] = accuracy_errors(items)["question_se"]
    return out


def norm_profile_stats(per_seed: list) -> dict | None:
    """The base's expert weight-RMS profile at each save, mean ± SE over seeds, with the seam a stack
    creates (last layer minus first) against the typical neighbour step."""
    if not all(s["base"].get("norm_profiles") for s in per_seed):
        return None
    saves = []
    for k, save in enumerate(per_seed[0]["base"]["saves"]):
        profiles = [s["base"]["norm_profiles"][k]["experts"] for s in per_seed]
        layers = len(profiles[0])
        per_layer = [mean_se([p[i] for p in profiles]) for i in range(layers)]
        steps = [sorted(abs(b - a) for a, b in zip(p, p[1:]))[(layers - 1) // 2] for p in profiles]
        jumps = [p[-1] - p[0] for p in profiles]
        saves.append({"iteration": save["iteration"], "sunk_over_fc": save["sunk_over_fc"],
                      "experts": {"mean": [x["mean"] for x in per_layer], "se": [x["se"] for x in per_layer]},
                      "seam_jump": mean_se(jumps), "median_step": mean_se(steps),
                      "seam_ratio": mean_se([j / st if st else float("nan") for j, st in zip(jumps, steps)])})
    return {"saves": saves}


# Past this many passes over the corpus, the base learns its text by heart: the growth comparisons
# then measure memorisation (the default corpus is one book, ~1.3-1.9 M tokens).
MAX_BASE_EPOCHS = 4.0


def _say_plan(rsize: ReproSize, plan: SeedPlan, corpus_tokens: int) -> None:
    size = resolved_size(rsize)
    n_a = count_params(plan.meta["base"]["model"]).activated
    f_c, per_step = chinchilla_flops(n_a), base_flops_per_step(size)
    saves = save_iterations(rsize)
    _say(f"base: {size.num_layers}L {size.num_moe_experts}E top-{size.moe_router_topk}, N_a {n_a:,}, "
         f"F_c {f_c:.3e}; saves at iterations {saves} = "
         + ", ".join(f"{it * per_step / f_c:.2f}" for it in saves) + " F_c")
    _say(f"steps per seed ({len(plan.steps)}): " + ", ".join(s["name"] for s in plan.steps)
         + f"; {size.grown_iters} steps each after growth")
    epochs = size.base_iters * size.global_batch_size * size.seq_length / max(corpus_tokens, 1)
    _say(f"the base reads {epochs:.1f} passes over the {corpus_tokens:,}-token corpus by its last save")
    if epochs > MAX_BASE_EPOCHS:
        _say(f"warning: more than {MAX_BASE_EPOCHS:g} passes: the base memorises the text and the findings "
             "measure that; pass a larger corpus with --text (.txt[.gz]/.jsonl[.gz]) for this size")


def _label(raw_dir: str) -> str:
    """How the report names the raw directory: relative to the current directory when inside it (so that
    the committed report does not depend on where the repository is checked out)."""
    rel = os.path.relpath(os.path.abspath(raw_dir))
    return raw_dir if rel.startswith("..") else rel


def read_notes(raw_dir: str) -> str | None:
    """RAW_DIR/notes.md: the reading written by hand for these records (included in the report verbatim)."""
    path = os.path.join(raw_dir, "notes.md")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write_outputs(report_dir: str, summary: dict) -> None:
    os.makedirs(report_dir, exist_ok=True)
    summary["plots"], summary["plot_titles"] = write_plots(summary, report_dir)
    md = format_markdown(summary)
    with open(os.path.join(report_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(md + "\n")
    _say(f"wrote {os.path.join(report_dir, 'results.md')} and {len(summary['plots'])} plots")
