"""The end-to-end demo: train a small MoE, grow it (depth then width), train on, and compare
with the grown architecture trained from scratch at equal *additional* FLOPs (NOTES.md 6-7).

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
5. scratch: the grown architecture (``make_growth_plan(base, growth).target``) from random init,
   for the same number of steps with the same batch, i.e. the same additional FLOPs
   (``flops_so_far - sunk_flops`` of the grown run; checked).

Each phase is also evaluated once before its first step (the trainer validates only after
steps), so the curves start where the weights start: random init, or the grown checkpoint.

Outputs in WORKDIR: ``results.json`` (every number), ``loss_vs_flops.png`` and the table that
is printed (``table.txt``). Only the sizes differ between CPU and GPU (``SIZES``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

REPO_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus",
                           "kjv.txt.gz")


@dataclass(frozen=True)
class DemoSize:
    """Everything the demo chooses: the base architecture, batch and step counts."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    num_moe_experts: int
    moe_router_topk: int
    moe_ffn_hidden_size: int
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    base_iters: int        # steps of the base (constant LR; should reach its plateau)
    grown_iters: int       # steps after growth (grown and scratch alike)
    eval_interval: int
    eval_iters: int
    lr: float
    vocab_size: int = 512


SIZES = {
    # 2 CPU cores, 2 ranks (EP=2), under 5 minutes in all (docs/demo.md has the measured time).
    "cpu": DemoSize("cpu", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    kv_channels=16, num_moe_experts=4, moe_router_topk=1, moe_ffn_hidden_size=64,
                    seq_length=64, micro_batch_size=8, global_batch_size=16, base_iters=400,
                    grown_iters=150, eval_interval=25, eval_iters=4, lr=3e-3),
    # The CI variant: every phase, a few steps each.
    "reduced": DemoSize("reduced", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        kv_channels=16, num_moe_experts=4, moe_router_topk=1, moe_ffn_hidden_size=64,
                        seq_length=64, micro_batch_size=8, global_batch_size=16, base_iters=30,
                        grown_iters=10, eval_interval=10, eval_iters=2, lr=3e-3),
    # One or more GPUs: a larger vocabulary and model, more steps (minutes on one H100).
    "gpu": DemoSize("gpu", num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                    kv_channels=32, num_moe_experts=8, moe_router_topk=1, moe_ffn_hidden_size=256,
                    seq_length=256, micro_batch_size=16, global_batch_size=64, base_iters=1500,
                    grown_iters=750, eval_interval=50, eval_iters=8, lr=2e-3, vocab_size=4096),
}

GROWTH = {
    "order": ["depth", "width"],
    "depth": {"mode": "interposition", "factor": 2},
    "width": {"factor": 2, "noise": "gaussian", "alpha": 0.01},
}


def choose_size(size: str, reduced: bool) -> DemoSize:
    if reduced:
        return SIZES["reduced"]
    if size == "auto":
        import torch

        size = "gpu" if torch.cuda.is_available() else "cpu"
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of cpu, gpu, auto")
    return SIZES[size]


def default_ranks(size: DemoSize) -> int:
    import torch

    if torch.cuda.is_available() and size.name == "gpu":
        return torch.cuda.device_count()
    return max(1, min(2, os.cpu_count() or 1))


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# 1. Data


def prepare_data(workdir: str, texts: Sequence[str], vocab_size: int, workers: int = 2) -> dict:
    """Tokenizer + indexed dataset under WORKDIR/data (each skipped when its output exists)."""
    from megatron_grow.data.preprocess import preprocess
    from megatron_grow.data.tokenizer import train_tokenizer

    data_dir = os.path.join(workdir, "data")
    os.makedirs(data_dir, exist_ok=True)
    # A different text set or vocabulary gets its own files, so a stale dataset is never reused.
    import hashlib

    key = hashlib.sha1(json.dumps([[os.path.abspath(t), os.path.getsize(t)] for t in texts]
                                  + [vocab_size]).encode()).hexdigest()[:8]
    tok_prefix = os.path.join(data_dir, f"tok{vocab_size}_{key}")
    ds_prefix = os.path.join(data_dir, f"corpus_{key}")
    t0 = time.perf_counter()
    if os.path.isfile(tok_prefix + ".model"):
        _say(f"tokenizer {tok_prefix}.model exists, skipping")
    else:
        s = train_tokenizer(list(texts), tok_prefix, vocab_size, num_threads=workers)
        _say(f"trained a {s.vocab_size}-piece {s.model_type} tokenizer in {s.seconds:.1f}s -> {s.model_file}")
    if os.path.isfile(ds_prefix + ".bin") and os.path.isfile(ds_prefix + ".idx"):
        _say(f"dataset {ds_prefix}.bin/.idx exists, skipping")
        tokens = None
    else:
        s = preprocess(list(texts), tok_prefix + ".model", ds_prefix, workers=workers, append_eod=True,
                       progress=False)
        tokens = s.tokens
        _say(f"tokenized {s.documents} documents, {s.tokens:,} tokens in {s.seconds:.1f}s -> {ds_prefix}")
    return {"tokenizer_model": tok_prefix + ".model", "prefix": ds_prefix, "tokens": tokens,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# 2-5. Recipes


def base_model_section(size: DemoSize) -> dict:
    return {
        "num_layers": size.num_layers, "hidden_size": size.hidden_size,
        "num_attention_heads": size.num_attention_heads, "num_query_groups": size.num_query_groups,
        "kv_channels": size.kv_channels, "num_moe_experts": size.num_moe_experts,
        "moe_router_topk": size.moe_router_topk, "moe_ffn_hidden_size": size.moe_ffn_hidden_size,
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
        "moe_router_load_balancing_type": "global_aux_loss", "moe_aux_loss_coeff": 1e-3,
        "qk_layernorm": True, "normalization": "RMSNorm", "vocab_size": size.vocab_size,
        "make_vocab_size_divisible_by": 128, "seq_length": size.seq_length,
        "untie_embeddings_and_output_weights": True,
    }


def parallel_section(size: DemoSize, ranks: int) -> dict:
    """EP over all ranks when the base's experts allow it (the MoE layout), else plain DP."""
    ep = ranks if size.num_moe_experts % ranks == 0 else 1
    return {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": ep}


def training_section(size: DemoSize, seed: int = 1234) -> dict:
    """The ``training:`` section without ``train_iters``: constant LR, no warmup (shared with repro)."""
    return {
        "micro_batch_size": size.micro_batch_size, "global_batch_size": size.global_batch_size,
        "lr": size.lr, "min_lr": size.lr, "lr_decay_style": "constant", "lr_warmup_iters": 0,
        "eval_interval": size.eval_interval, "eval_iters": size.eval_iters, "bf16": size.name == "gpu",
        "seed": seed,
    }


def common_sections(size: DemoSize, ranks: int, data: dict) -> dict:
    """The ``parallel:``, ``data:`` and ``logging:`` sections every run of the demo shares."""
    return {
        "parallel": parallel_section(size, ranks),
        "data": {"data_path": [data["prefix"]], "tokenizer_model": data["tokenizer_model"], "split": "98,2,0"},
        "logging": {"log_interval": max(1, size.eval_interval // 2)},
    }


def build_recipes(workdir: str, size: DemoSize, ranks: int, data: dict) -> dict:
    """Write the three training recipes (and the growth recipe) as YAML; return their paths."""
    import yaml

    from megatron_grow.config.loader import load_recipe, recipe_to_dict
    from megatron_grow.growth.plan import make_growth_plan

    runs = os.path.join(workdir, "runs")
    rdir = os.path.join(workdir, "recipes")
    os.makedirs(rdir, exist_ok=True)
    training = training_section(size)
    common = common_sections(size, ranks, data)

    def ckpt(name, interval):
        d = os.path.join(runs, name)
        return {"save": d, "load": d, "save_interval": interval, "keep_last": 1}

    base = dict(common, model=base_model_section(size),
                training=dict(training, train_iters=size.base_iters),
                checkpoint=ckpt("base", size.base_iters))
    base_recipe = load_recipe(raw=base)
    target = make_growth_plan(base_recipe.model, load_recipe(raw=dict(base, growth=GROWTH)).growth).target
    # The grown run: model = the base (the source), growth = the operators, load = the offline
    # grow's output (runs/grown_init, kept for inspection), save = runs/grown; train_iters is
    # absolute, so it continues from the base's iteration.
    grown = dict(common, model=base_model_section(size), growth=GROWTH,
                 training=dict(training, train_iters=size.base_iters + size.grown_iters),
                 checkpoint=dict(ckpt("grown", size.grown_iters), load=os.path.join(runs, "grown_init")))
    scratch = dict(common, model=recipe_to_dict(target),
                   training=dict(training, train_iters=size.grown_iters),
                   checkpoint=ckpt("scratch", size.grown_iters))
    paths = {}
    for name, raw in (("base", base), ("grown", grown), ("scratch", scratch)):
        load_recipe(raw=raw)  # validate before anything runs
        paths[name] = os.path.join(rdir, f"{name}.yaml")
        with open(paths[name], "w") as f:
            yaml.safe_dump(raw, f, sort_keys=False)
    return paths


# ------------------------------------------------------------------------------------------------
# Bodies run on every rank (module-level so that spawned processes can import them)


def _evaluate_now(recipe, model) -> float | None:
    """Validation loss of the weights a run starts from (checkpoint under load, or random init),
    with the trainer's own evaluation; the trainer then rebuilds and re-seeds for training."""
    from megatron_grow.training.checkpointing import has_checkpoint, load_training_checkpoint
    from megatron_grow.training.trainer import Trainer

    ev = Trainer(recipe, model=model)
    ev.build()
    if has_checkpoint(recipe.checkpoint.load):
        ev.load_weights(recipe.checkpoint.load)
    ev.build_data()
    loss = ev.evaluate()
    del ev
    return loss


def train_phase_body(recipe_path: str) -> dict:
    """``megatron-grow train --config recipe_path`` (resume-aware), plus a validation at the start."""
    from megatron_grow.growth.grown_model import grown_model_of
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.training.checkpointing import has_checkpoint
    from megatron_grow.training.trainer import Trainer

    recipe = load_recipe(recipe_path)
    model = recipe.model
    if recipe.growth is not None:
        if not has_checkpoint(recipe.checkpoint.load):
            raise RuntimeError(f"{recipe_path}: the grown checkpoint is missing under {recipe.checkpoint.load}")
        model = grown_model_of(recipe.checkpoint.load, recipe.model, recipe.growth)
    start_counters = None
    if has_checkpoint(recipe.checkpoint.load):
        from megatron_grow.checkpoint import layout
        from megatron_grow.checkpoint.manifest import read_checkpoint_info

        d, it = layout.resolve_checkpoint_dir(recipe.checkpoint.load)
        start_counters = dict(read_checkpoint_info(d, it).counters)
    start_loss = _evaluate_now(recipe, model)
    run = Trainer(recipe, model=model).run()
    return {"exit_code": run.exit_code, "iteration": run.iteration, "train_losses": run.train_losses,
            "valid_losses": run.valid_losses, "counters": run.counters, "last_checkpoint": run.last_checkpoint,
            "start_loss": start_loss, "start_counters": start_counters}


def grow_body(source: str, grown: str, recipe_path: str) -> dict:
    """``megatron-grow grow --load source --save grown --recipe recipe_path`` (with its --verify)."""
    import torch

    from megatron_grow.config.loader import load_recipe, recipe_to_dict
    from megatron_grow.growth.grow import grow_checkpoint
    from megatron_grow.growth.verify import format_metrics, verify_growth

    t0 = time.perf_counter()
    recipe = load_recipe(recipe_path)
    summary = grow_checkpoint(source, grown, recipe.growth, recipe.parallel, recipe_dict=recipe_to_dict(recipe),
                              overwrite=True, seed=recipe.training.seed)
    metrics = verify_growth(source, grown, recipe.parallel)
    if torch.distributed.get_rank() == 0:
        print(format_metrics(metrics), flush=True)
    return {"summary": summary, "verify": metrics, "seconds": time.perf_counter() - t0}


def grow_then_train_body(source: str, grown: str, recipe_path: str) -> dict:
    """Offline growth, then training from its output, in the same processes (one start-up fewer;
    the trainer re-initialises the model-parallel state as a fresh run would)."""
    grow = grow_body(source, grown, recipe_path)
    out = train_phase_body(recipe_path)
    out["grow"] = grow
    return out


# ------------------------------------------------------------------------------------------------
# Orchestration


def _spawn(fn, ranks: int, args: tuple, timeout: float) -> dict:
    from megatron_grow.parallel.spawn import run_in_processes

    # Library warnings (no TE/apex on CPU, deprecations) are read at interpreter start-up, so the
    # children inherit the filter from this process's environment.
    saved = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning"
    try:
        results = run_in_processes(fn, ranks, args, timeout=timeout, threads_per_rank=1, env={"OMP_NUM_THREADS": "1"})
    finally:
        if saved is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = saved
    return results[0]


def _additional(points: list, sunk: float) -> list:
    return [(it, loss, flops - sunk) for it, loss, flops in points]


def interpolate(points: list, x: float) -> float | None:
    """Loss at ``x`` by linear interpolation over (x, loss) points sorted by x; None outside."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def run_demo(workdir: str = "runs/demo", texts: Sequence[str] | None = None, size: str = "auto",
             reduced: bool = False, ranks: int | None = None) -> dict:
    """All five phases; returns the results dict also written to WORKDIR/results.json."""
    t_start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    demo_size = choose_size(size, reduced)
    ranks = ranks or default_ranks(demo_size)
    texts = [os.path.abspath(t) for t in (texts or [REPO_CORPUS])]
    for t in texts:
        if not os.path.isfile(t):
            raise FileNotFoundError(f"--text {t}: no such file")
    load = _load_average()
    _say(f"size {demo_size.name}, {ranks} rank(s), workdir {workdir}; load average {load}")
    timings = {}

    _say("1/5 data: tokenizer and indexed dataset")
    data = prepare_data(workdir, texts, demo_size.vocab_size, workers=max(1, min(2, os.cpu_count() or 1)))
    timings["data"] = data["seconds"]
    recipes = build_recipes(workdir, demo_size, ranks, data)
    runs = os.path.join(workdir, "runs")
    for name in ("base", "grown_init", "grown", "scratch"):  # training starts over; the data is reused
        shutil.rmtree(os.path.join(runs, name), ignore_errors=True)
    per_phase_timeout = 3600.0

    def phase(name, fn, args):
        t0 = time.perf_counter()
        out = _spawn(fn, ranks, args, per_phase_timeout)
        timings[name] = time.perf_counter() - t0
        _say(f"{name} done in {timings[name]:.1f}s")
        return out

    _say(f"2/5 base: {demo_size.base_iters} steps at a constant LR ({recipes['base']})")
    base = phase("base", train_phase_body, (recipes["base"],))
    _check_run("base", base)
    _say("3/5 grow: depth interposition x2, then width x2 (alpha 0.01, top-k x2) with grow_checkpoint, "
         "then verify_growth;")
    _say(f"4/5 grown: then {demo_size.grown_iters} more steps from the grown checkpoint ({recipes['grown']})")
    grown = phase("grow+grown", grow_then_train_body, (os.path.join(runs, "base"),
                                                       os.path.join(runs, "grown_init"), recipes["grown"]))
    grow = grown.pop("grow")
    timings["grow"] = grow["seconds"]
    _check_run("grown", grown)
    _say(f"5/5 scratch: the grown architecture from random init, {demo_size.grown_iters} steps "
         f"({recipes['scratch']})")
    scratch = phase("scratch", train_phase_body, (recipes["scratch"],))
    _check_run("scratch", scratch)

    results = summarize(demo_size, ranks, texts, data, recipes, base, grow, grown, scratch)
    results["checkpoints"] = {name: os.path.join(runs, name) for name in ("base", "grown_init", "grown", "scratch")}
    timings["total"] = time.perf_counter() - t_start
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["load_average_start"] = load
    results["load_average_end"] = _load_average()
    table = format_table(results)
    print(table, flush=True)
    results["table"] = table
    with open(os.path.join(workdir, "table.txt"), "w") as f:
        f.write(table + "\n")
    results["plot"] = write_plot(results, os.path.join(workdir, "loss_vs_flops.png"))
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _say(f"wrote {results['plot']}, {os.path.join(workdir, 'results.json')}, {os.path.join(workdir, 'table.txt')}")
    _say(f"total wall time {timings['total']:.1f}s (load average at the end {results['load_average_end']})")
    return results


def _check_run(name: str, run: dict) -> None:
    if run["exit_code"] != 0:
        raise RuntimeError(f"the {name} run exited with code {run['exit_code']}")
    if not run["valid_losses"]:
        raise RuntimeError(f"the {name} run recorded no validation loss (nothing to train? delete its checkpoint)")


def _load_average() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def summarize(size: DemoSize, ranks: int, texts, data, recipes, base, grow, grown, scratch) -> dict:
    """Curves on one FLOPs axis, and the grown-vs-scratch comparison at equal additional FLOPs."""
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.growth.plan import make_growth_plan
    base_recipe = load_recipe(recipes["base"])
    grown_recipe = load_recipe(recipes["grown"])
    target = make_growth_plan(base_recipe.model, grown_recipe.growth).target
    gbs, seq = size.global_batch_size, size.seq_length
    sunk = grown["counters"]["sunk_flops"]
    if sunk != base["counters"]["flops_so_far"]:
        raise RuntimeError(f"sunk FLOPs of the grown run ({sunk:.4e}) != the base's FLOPs "
                           f"({base['counters']['flops_so_far']:.4e})")
    grown_extra = grown["counters"]["flops_so_far"] - sunk
    scratch_extra = scratch["counters"]["flops_so_far"] - scratch["counters"]["sunk_flops"]
    if not math.isclose(grown_extra, scratch_extra, rel_tol=1e-9):
        raise RuntimeError(f"additional FLOPs differ: grown {grown_extra:.4e}, scratch {scratch_extra:.4e}")

    def curve(run, start_flops):
        pts = [(start_flops, run["start_loss"])] if run["start_loss"] is not None else []
        return pts + [(f, loss) for _, loss, f in run["valid_losses"]]

    base_curve = curve(base, 0.0)
    grown_curve = curve(grown, sunk)           # total FLOPs (sunk included)
    scratch_curve = curve(scratch, 0.0)        # its total FLOPs = its additional FLOPs
    grown_add = [(f - sunk, loss) for f, loss in grown_curve]
    compare = []
    for f, loss in grown_add:
        s = interpolate(scratch_curve, f)
        compare.append({"additional_flops": f, "grown": loss, "scratch": s})
    end = compare[-1]
    # How many additional FLOPs scratch needed to reach the grown model's final loss (if it did).
    scratch_reach = next((f for f, loss in scratch_curve if loss <= end["grown"]), None)
    return {
        "size": dataclasses.asdict(size), "ranks": ranks, "texts": texts,
        "dataset": {"prefix": data["prefix"], "tokenizer_model": data["tokenizer_model"], "tokens": data["tokens"]},
        "recipes": recipes,
        "models": {
            "base": _model_summary(base_recipe.model, gbs, seq),
            "grown": _model_summary(target, gbs, seq),
        },
        "growth": {"operators": GROWTH, "summary": grow["summary"], "verify": grow["verify"]},
        "sunk_flops": sunk,
        "additional_flops": grown_extra,
        "curves": {"base": base_curve, "grown": grown_curve, "scratch": scratch_curve},
        "train_losses": {"base": base["train_losses"], "grown": grown["train_losses"],
                         "scratch": scratch["train_losses"]},
        "counters": {"base": base["counters"], "grown": grown["counters"], "scratch": scratch["counters"]},
        "equal_additional_flops": compare,
        "final": {"base": base_curve[-1][1], "grown": end["grown"], "scratch": end["scratch"],
                  "grown_minus_scratch": end["grown"] - end["scratch"],
                  "scratch_flops_to_reach_grown_final": scratch_reach},
    }


def _model_summary(model, gbs: int, seq: int) -> dict:
    from megatron_grow.models.params import count_params
    from megatron_grow.training.flops import training_flops_per_step

    return {"params": count_params(model).as_dict(), "layers": model.num_layers,
            "experts": model.num_moe_experts, "topk": model.moe_router_topk,
            "flops_per_step": training_flops_per_step(model, gbs, seq)}


def format_table(r: dict) -> str:
    b, g = r["models"]["base"], r["models"]["grown"]
    lines = [
        "",
        f"base  : {b['layers']} layers, {b['experts']} experts, top-{b['topk']}, {b['params']['total']:,} params "
        f"({b['params']['activated']:,} activated), {b['flops_per_step']:.3e} FLOPs/step",
        f"grown : {g['layers']} layers, {g['experts']} experts, top-{g['topk']}, {g['params']['total']:,} params "
        f"({g['params']['activated']:,} activated), {g['flops_per_step']:.3e} FLOPs/step",
        f"growth check: KL(base || grown) {r['growth']['verify'].get('kl_mean', float('nan')):.3e}, "
        f"routing share of copies {r['growth']['verify']['routing_share_copies']:.3f}",
        "",
        "validation loss vs FLOPs",
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
    f = r["final"]
    verdict = "beats" if f["grown_minus_scratch"] < 0 else "does NOT beat"
    reach = f["scratch_flops_to_reach_grown_final"]
    lines += [
        "",
        f"after {r['additional_flops']:.3e} additional FLOPs the grown model {verdict} scratch: "
        f"{f['grown']:.4f} vs {f['scratch']:.4f} ({f['grown_minus_scratch']:+.4f}); the base ended at {f['base']:.4f}",
        (f"scratch reached the grown model's final loss after {reach:.3e} FLOPs" if reach is not None
         else "scratch did not reach the grown model's final loss within the same additional FLOPs"),
    ]
    return "\n".join(lines)


def write_plot(r: dict, path: str) -> str:
    """Two honest panels: total FLOPs (sunk cost visible) and additional FLOPs (the paper's comparison)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = r["curves"]
    sunk = r["sunk_flops"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    style = {"base": dict(color="tab:blue"), "grown": dict(color="tab:red"),
             "scratch": dict(color="tab:gray", linestyle="--")}
    b, g = r["models"]["base"], r["models"]["grown"]
    labels = {
        "base": f"base ({b['layers']}L, {b['experts']}E, top-{b['topk']})",
        "grown": f"grown ({g['layers']}L, {g['experts']}E, top-{g['topk']}), from the base",
        "scratch": f"scratch ({g['layers']}L, {g['experts']}E, top-{g['topk']}), random init",
    }
    for name in ("base", "grown", "scratch"):
        xs, ys = zip(*c[name])
        ax1.plot(xs, ys, marker=".", label=labels[name], **style[name])
    ax1.axvline(sunk, color="k", linewidth=0.8, linestyle=":")
    ax1.annotate("growth (sunk cost)", (sunk, ax1.get_ylim()[1]), textcoords="offset points", xytext=(3, -12),
                 fontsize=8)
    ax1.set_xlabel("total training FLOPs\n(the grown curve starts at the base's sunk FLOPs)")
    ax1.set_ylabel("validation loss (nats/token)")
    ax1.set_title("validation loss vs total FLOPs")
    ax1.legend(fontsize=8)
    for name in ("grown", "scratch"):
        pts = [(f - (sunk if name == "grown" else 0.0), loss) for f, loss in c[name]]
        xs, ys = zip(*pts)
        ax2.plot(xs, ys, marker=".", label=labels[name], **style[name])
    ax2.axhline(c["base"][-1][1], color="tab:blue", linewidth=0.8, linestyle=":", label="base, final")
    ax2.set_xlabel("additional FLOPs after growth\n(the base's sunk cost not counted)")
    ax2.set_ylabel("validation loss (nats/token)")
    ax2.set_title("grown vs scratch at equal additional FLOPs")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: megatron-grow demo")
