"""The GPU check's measurements: a paper-shaped small MoE trained on the real data pipeline
(tokens/s, TFLOP/s, MFU), the same shape in ``transformers`` (Qwen3-MoE, bf16, same batch) for
a tokens/s ratio, growth of the trained checkpoint on the GPU and a resume of it, a
``torch.profiler`` table, and the bf16 matmul ceiling of the device. Thin code over the
package: ``Trainer``, ``grow_checkpoint``, ``build_gpt_model``, ``prepare_data``.

    python benchmarks/gpu_bench.py --out DIR            # on a GPU machine (scripts/gpu/check.sh runs it)
    python benchmarks/gpu_bench.py --out DIR --dry-run  # tiny shapes on CPU: every phase, few steps

Every phase runs in a fresh process (``run_in_processes``) and records its numbers in
``DIR/summary.json``; the table at the end is also written to ``DIR/summary.md``. A phase that
fails is recorded with its error and the others still run; the exit code is 1 then.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_grow.parallel.spawn import run_in_processes  # noqa: E402

CORPUS = os.path.join(REPO, "data", "corpus", "kjv.txt.gz")


@dataclasses.dataclass(frozen=True)
class BenchShape:
    """Model and batch of the measured run (``model:`` keys of a recipe, plus the batch)."""

    model: dict
    micro_batch_size: int
    global_batch_size: int
    train_steps: int
    log_interval: int
    sequential_steps: int
    resume_steps: int
    hf_steps: int
    profile_steps: int
    corpus_chars: int | None  # None: the whole corpus


PAPER_SMALL = {  # 16 layers, hidden 1024, 64 experts top-6 (the paper's layout, scaled down)
    "num_layers": 16, "hidden_size": 1024, "num_attention_heads": 16, "num_query_groups": 4, "kv_channels": 64,
    "num_moe_experts": 64, "moe_router_topk": 6, "moe_ffn_hidden_size": 512, "vocab_size": 8192,
    "make_vocab_size_divisible_by": 128, "seq_length": 4096, "moe_expert_backend": "grouped_mm",
}
TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16,
        "num_moe_experts": 8, "moe_router_topk": 2, "moe_ffn_hidden_size": 32, "vocab_size": 512,
        "make_vocab_size_divisible_by": 128, "seq_length": 64, "moe_expert_backend": "grouped_mm"}

SHAPES = {
    "gpu": BenchShape(PAPER_SMALL, micro_batch_size=1, global_batch_size=8, train_steps=30, log_interval=5,
                      sequential_steps=10, resume_steps=4, hf_steps=6, profile_steps=3, corpus_chars=None),
    "dry": BenchShape(TINY, micro_batch_size=2, global_batch_size=4, train_steps=4, log_interval=2,
                      sequential_steps=2, resume_steps=2, hf_steps=2, profile_steps=1, corpus_chars=300_000),
}


def _say(msg: str) -> None:
    print(f"[gpu-bench] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Phases (each runs in its own process)


def matmul_ceiling(size: int, repeats: int) -> dict:
    """Dense matmul TFLOP/s of this device (bf16 on CUDA, fp32 on CPU), random data."""
    import torch

    cuda = torch.cuda.is_available()
    dtype, device = (torch.bfloat16, "cuda") if cuda else (torch.float32, "cpu")
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    seconds = time.perf_counter() - t0
    return {"tflops": 2 * size ** 3 * repeats / seconds / 1e12, "size": size, "dtype": str(dtype),
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def write_recipe(path: str, shape: BenchShape, data: dict, steps: int, *, save: str | None = None,
                 load: str | None = None, **model_overrides) -> str:
    import yaml

    recipe = {
        "model": {**shape.model, **model_overrides},
        "training": {"micro_batch_size": shape.micro_batch_size, "global_batch_size": shape.global_batch_size,
                     "train_iters": steps, "lr": 1e-3, "min_lr": 1e-4, "lr_decay_style": "constant",
                     "eval_interval": 100_000, "eval_iters": 0, "bf16": True},
        "data": {"data_path": [data["prefix"]], "tokenizer_model": data["tokenizer_model"], "split": "99,1,0"},
        # Weights only: the optimizer state of the measured model would be ~12 bytes/parameter of disk.
        "checkpoint": {"save": save, "load": load, "save_interval": 100_000, "keep_last": 1, "save_optim": False},
        "logging": {"log_interval": shape.log_interval},
    }
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path


def train_phase(recipe_path: str, overrides: list, grown_from: str | None = None) -> dict:
    """The trainer, as ``megatron-grow train`` runs it; ``grown_from`` resumes a grown checkpoint
    (whose architecture its manifest records)."""
    from megatron_grow.checkpoint import paths
    from megatron_grow.checkpoint.manifest import read_checkpoint_info
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.training.flops import training_flops_per_step
    from megatron_grow.training.peak_flops import current_device_peak
    from megatron_grow.training.trainer import Trainer

    recipe = load_recipe(recipe_path, overrides)
    model = recipe.model
    if grown_from:
        ckpt_dir, it = paths.resolve_checkpoint_dir(grown_from)
        recorded = read_checkpoint_info(ckpt_dir, it).model
        model = dataclasses.replace(recorded, moe_expert_backend=recipe.model.moe_expert_backend)
    t0 = time.perf_counter()
    run = Trainer(recipe, model=model).run()
    steady = run.intervals[1:] or run.intervals  # the first interval holds warm-up (allocator, autotuning)
    steps = sum(i["steps"] for i in steady)
    seconds = sum(i["seconds"] for i in steady)
    t = recipe.training
    flops = training_flops_per_step(model, t.global_batch_size, model.seq_length)
    achieved = flops * steps / seconds / max(1, _world())
    peak = current_device_peak(recipe.logging.peak_tflops)
    return {
        "losses": [loss for _, loss in run.train_losses], "iteration": run.iteration, "peak": run.peak,
        "steady_steps": steps, "steady_seconds": seconds,
        "tokens_per_s": t.global_batch_size * model.seq_length * steps / seconds,
        "tflops_per_gpu": achieved / 1e12, "mfu": achieved / peak.flops if peak.flops else None,
        "flops_per_step": flops, "wall_seconds": time.perf_counter() - t0,
        "checkpoint": run.last_checkpoint, "layers": model.num_layers, "experts": model.num_moe_experts,
    }


def _world() -> int:
    import torch

    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def grow_phase(source_root: str, grown_root: str) -> dict:
    """Depth x2 (interposition) of the trained checkpoint, built and written on this device."""
    from megatron_grow.config.schema import DepthGrowthConfig, GrowthConfig, ParallelConfig
    from megatron_grow.growth.grow import grow_checkpoint

    growth = GrowthConfig(order=("depth",), depth=DepthGrowthConfig(factor=2))
    t0 = time.perf_counter()
    summary = grow_checkpoint(source_root, grown_root, growth, ParallelConfig(), progress=True,
                              expert_backend="grouped_mm")
    return {"seconds": time.perf_counter() - t0, "summary": {k: v for k, v in summary.items()
                                                              if isinstance(v, (int, float, str))}}


def hf_qwen3_moe_config(model: dict, padded_vocab: int):
    """The same shape as a ``transformers`` Qwen3-MoE (every layer sparse, GQA, q/k RMSNorm, SwiGLU experts)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=padded_vocab, hidden_size=model["hidden_size"], intermediate_size=model["moe_ffn_hidden_size"],
        moe_intermediate_size=model["moe_ffn_hidden_size"], num_hidden_layers=model["num_layers"],
        num_attention_heads=model["num_attention_heads"], num_key_value_heads=model["num_query_groups"],
        head_dim=model["kv_channels"], num_experts=model["num_moe_experts"],
        num_experts_per_tok=model["moe_router_topk"], decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=model["seq_length"], rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, norm_topk_prob=True, output_router_logits=False, use_cache=False)


def hf_phase(recipe_path: str, steps: int) -> dict:
    """Qwen3-MoE from ``transformers`` in bf16 (torch AdamW), fed the same micro batches as the trainer."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    from megatron_grow.config.loader import load_recipe
    from megatron_grow.data.datasets import build_datasets, make_batch_iterator
    from megatron_grow.data.tokenizer import load_tokenizer
    from megatron_grow.models.mcore_config import padded_vocab_size
    from megatron_grow.parallel.init import initialize_distributed
    from megatron_grow.training.flops import training_flops_per_step

    recipe = load_recipe(recipe_path)
    m, t = recipe.model, recipe.training
    initialize_distributed(recipe.parallel)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config = hf_qwen3_moe_config(dataclasses.asdict(m), padded_vocab_size(m))
    with torch.device(device):  # initialise on the device: a CPU init of the full model takes minutes
        model = Qwen3MoeForCausalLM(config)
    model = model.to(dtype=dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr)
    datasets = build_datasets(recipe.data, m, t, load_tokenizer(recipe.data.tokenizer_model))
    batches = make_batch_iterator(datasets.train, 0, t.micro_batch_size, 0, 1)
    accumulation = t.global_batch_size // t.micro_batch_size
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, losses = [], []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        for _ in range(accumulation):
            batch = next(batches)
            out = model(input_ids=batch["tokens"].to(device))
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]),
                                                     batch["labels"].to(device).view(-1))
            (loss / accumulation).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    steady = times[1:] or times
    tokens = t.global_batch_size * m.seq_length
    flops = training_flops_per_step(m, t.global_batch_size, m.seq_length)
    return {"tokens_per_s": tokens * len(steady) / sum(steady), "tflops_per_gpu": flops * len(steady) / sum(steady)
            / 1e12, "losses": losses, "steps": steps, "transformers_class": type(model).__name__,
            "experts_implementation": str(getattr(config, "_experts_implementation", "default")),
            "attn_implementation": str(getattr(config, "_attn_implementation", "default"))}


def profile_phase(recipe_path: str, steps: int, out_dir: str) -> dict:
    """``torch.profiler`` over forward+backward steps of the measured model: top ops by device time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from megatron_grow.config.loader import load_recipe
    from megatron_grow.models.builder import build_gpt_model
    from megatron_grow.models.forward import causal_attention_mask, position_ids_for
    from megatron_grow.parallel.init import initialize_distributed

    recipe = load_recipe(recipe_path)
    m, t = recipe.model, recipe.training
    initialize_distributed(recipe.parallel)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = build_gpt_model(m, params_dtype=torch.bfloat16 if cuda else torch.float32)
    tokens = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length), device=device)
    mask = causal_attention_mask(m.seq_length, device)

    def step():
        model(tokens, position_ids_for(tokens), mask, labels=tokens).float().mean().backward()

    step()  # warm-up outside the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=40)
    path = os.path.join(out_dir, "profile.txt")
    with open(path, "w") as f:
        f.write(f"torch.profiler, {steps} forward+backward micro batches of {t.micro_batch_size} x {m.seq_length}, "
                f"sorted by {sort_by}\n\n{table}\n")
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key, 0) for e in events) or 1
    top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:8]
    return {"table": path, "top": [(e.key, round(100 * getattr(e, key, 0) / total, 1)) for e in top]}


def prepare_corpus(work: str, shape: BenchShape) -> dict:
    """A sentencepiece tokenizer and MCore indexed dataset of the shipped corpus (the real pipeline)."""
    from megatron_grow.data.preprocess import preprocess
    from megatron_grow.data.tokenizer import train_tokenizer

    os.makedirs(work, exist_ok=True)
    text = CORPUS
    if shape.corpus_chars is not None:
        text = os.path.join(work, "corpus_part.txt")
        with gzip.open(CORPUS, "rt", encoding="utf-8") as f, open(text, "w", encoding="utf-8") as out:
            out.write(f.read(shape.corpus_chars))
    t0 = time.perf_counter()
    tok = train_tokenizer([text], os.path.join(work, "tok"), shape.model["vocab_size"],
                          num_threads=max(1, min(16, os.cpu_count() or 1)))
    ds = preprocess([text], tok.model_file, os.path.join(work, "corpus"), workers=max(1, min(8, os.cpu_count() or 1)),
                    append_eod=True, progress=False)
    return {"tokenizer_model": tok.model_file, "prefix": os.path.join(work, "corpus"), "tokens": ds.tokens,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# Orchestration


def run_phase(results: dict, name: str, fn, *args, timeout: float = 600.0) -> dict:
    """``fn(*args)`` in one fresh process; its dict (or its error) lands in ``results[name]``."""
    _say(f"{name} ...")
    t0 = time.perf_counter()
    try:
        out = {"ok": True, **run_in_processes(fn, 1, args, timeout=timeout)[0]}
    except Exception as e:  # recorded, and the remaining phases still run
        out = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-3000:]}"}
    out["phase_seconds"] = time.perf_counter() - t0
    results[name] = out
    _say(f"{name}: {'ok' if out['ok'] else 'FAILED'} in {out['phase_seconds']:.1f}s")
    return out


def run_all(out_dir: str, shape: BenchShape, *, sequential: bool = True) -> dict:
    work = os.path.join(out_dir, "work")
    results: dict = {"shape": dataclasses.asdict(shape), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    cuda = _cuda()
    run_phase(results, "matmul_ceiling", matmul_ceiling, 8192 if cuda else 256, 20 if cuda else 3)
    _say("preparing the corpus (tokenizer + indexed dataset) ...")
    data = prepare_corpus(work, shape)
    results["data"] = data
    run_dir, grown_dir = os.path.join(work, "run"), os.path.join(work, "grown")
    recipe = write_recipe(os.path.join(work, "bench.yaml"), shape, data, shape.train_steps, save=run_dir)
    train = run_phase(results, "train", train_phase, recipe, [])
    if sequential:
        seq_recipe = write_recipe(os.path.join(work, "sequential.yaml"), shape, data, shape.sequential_steps,
                                  moe_expert_backend="sequential")
        run_phase(results, "train_sequential", train_phase, seq_recipe, [])
    run_phase(results, "transformers", hf_phase, recipe, shape.hf_steps)
    if train["ok"]:
        grow = run_phase(results, "grow", grow_phase, run_dir, grown_dir)
        if grow["ok"]:
            resume = write_recipe(os.path.join(work, "resume.yaml"), shape, data,
                                  train["iteration"] + shape.resume_steps, load=grown_dir)
            run_phase(results, "resume_grown", train_phase, resume, [], grown_dir)
    run_phase(results, "profile", profile_phase, recipe, shape.profile_steps, out_dir)
    results["comparison"] = compare(results)
    return results


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compare(results: dict) -> dict:
    """The ratios the issue asks for, from the phases that ran."""
    out = {}
    train, hf, seq = results.get("train", {}), results.get("transformers", {}), results.get("train_sequential", {})
    ceiling = results.get("matmul_ceiling", {})
    if train.get("ok") and ceiling.get("ok"):
        out["mfu_vs_measured_matmul"] = train["tflops_per_gpu"] / ceiling["tflops"]
    if train.get("ok"):
        out["mfu_vs_table_peak"] = train.get("mfu")
        out["peak_used"] = train.get("peak")
    if train.get("ok") and hf.get("ok"):
        out["tokens_per_s_vs_transformers"] = train["tokens_per_s"] / hf["tokens_per_s"]
    if train.get("ok") and seq.get("ok"):
        out["grouped_mm_vs_sequential"] = train["tokens_per_s"] / seq["tokens_per_s"]
    return out


def summary_table(results: dict) -> str:
    rows = [("phase", "ok", "seconds", "figures")]
    for name in ("matmul_ceiling", "train", "train_sequential", "transformers", "grow", "resume_grown", "profile"):
        r = results.get(name)
        if r is None:
            continue
        if not r["ok"]:
            figures = r["error"].splitlines()[-1][:100] if r["error"] else "failed"
        elif "tokens_per_s" in r:
            mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
            figures = f"{r['tokens_per_s']:,.0f} tok/s, {r['tflops_per_gpu']:.1f} TFLOP/s{mfu}"
        elif "tflops" in r:
            figures = f"{r['tflops']:.1f} TFLOP/s ({r['dtype']}, {r['size']}^3, {r['device']})"
        elif name == "grow":
            figures = f"grown in {r['seconds']:.1f}s"
        else:
            figures = ", ".join(f"{k} {v}%" for k, v in r.get("top", [])[:3])
        rows.append((name, "yes" if r["ok"] else "NO", f"{r['phase_seconds']:.1f}", figures))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|---|---|---|---|")
    comp = results.get("comparison", {})
    lines.append("")
    for key, value in comp.items():
        lines.append(f"- {key}: {value:.3f}" if isinstance(value, float) else f"- {key}: {value}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for summary.json, summary.md, profile.txt, work/")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, few steps (runs on CPU)")
    ap.add_argument("--no-sequential", action="store_true", help="skip the SequentialMLP comparison run")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    shape = SHAPES["dry" if args.dry_run else "gpu"]
    t0 = time.perf_counter()
    try:
        results = run_all(args.out, shape, sequential=not args.no_sequential)
    except Exception:
        traceback.print_exc()
        return 1
    results["wall_seconds"] = time.perf_counter() - t0
    results["dry_run"] = args.dry_run
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    table = summary_table(results)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    _say(f"done in {results['wall_seconds']:.0f}s; " + (f"FAILED phases: {', '.join(failed)}" if failed
                                                        else "every phase ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
