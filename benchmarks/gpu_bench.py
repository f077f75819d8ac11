"""The GPU check: one call of at most ~7 minutes on one H100/H200 that records what the project
does on a GPU, phase by phase, each phase's numbers written the moment it ends.

    python benchmarks/gpu_bench.py --out DIR --bundle BUNDLE    # on the GPU (scripts/gpu/check.sh runs it)
    python benchmarks/gpu_bench.py --out DIR --dry-run          # tiny shapes on CPU: every phase, few steps
    python benchmarks/gpu_bench.py --prepare BUNDLE [--dry-run] # on CPU, beforehand: the data the check needs

Order (most information per second first): ``preflight`` (in this process, no Megatron-Core:
versions, GPU, MIG, free memory, grouped-GEMM kernel, TE, Triton, C compiler; without CUDA it
stops with one line and exit code 2), then each phase in a fresh process under its own time
limit (and never past the whole run's budget):

1. ``grouped_mm``: the experts' grouped GEMM against the per-expert loop, bf16, with empty groups:
   error against an fp32 reference, and time (forward + backward);
2. ``matmul_ceiling``: dense bf16 8192^3 matmuls, timed for at least one second;
3. ``data``: tokenizer + indexed dataset (only when the bundle has none; normally made on CPU);
4. ``growth_numerics``: a small MoE trained in bf16, grown on the GPU: width x2 with alpha 0
   (logit KL against the source, ~0) and depth x2 interposition trained 10 steps on (the loss
   continues where the source's ended);
5. ``train``: the paper-shaped small MoE with the real trainer: tokens/s, TFLOP/s and MFU with
   attention counted causal and full, peak memory;
6. ``profile``: ``torch.profiler`` over one forward+backward of the same model;
7. ``transformers``: the same shape as ``transformers``' Qwen3-MoE, same batches, tokens/s;
8. ``train_sequential``: ``train`` with MCore's ``SequentialMLP`` experts, on the same (local)
   layer spec, so the ratio is the experts' and not TE's fused attention.

Every phase writes ``DIR/phases/NN_name.json``, and ``DIR/summary.json`` / ``summary.md`` are
rewritten after each one: a timeout or a kill leaves every finished phase's numbers. Exit code:
0 every phase ran, 1 a phase failed or timed out, 2 no CUDA (or bad arguments).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Light imports only up here (no Megatron-Core): a CPU machine is refused in seconds. The phases
# import what they use inside their functions, in their own processes.
from megatron_grow.errors import EXIT_BAD_INPUT  # noqa: E402
from megatron_grow.parallel.spawn import run_in_processes  # noqa: E402
from megatron_grow.platform import cpu  # noqa: E402

CORPUS = os.path.join(REPO, "data", "corpus", "kjv.txt.gz")
GIB = 1024 ** 3
PHASES = ("grouped_mm", "matmul_ceiling", "data", "growth_numerics", "train", "profile", "transformers",
          "train_sequential")
NEEDS_DATA = ("growth_numerics", "train", "profile", "transformers", "train_sequential")
STALE = ("summary.json", "summary.md", "profile.txt", "preflight.json")


@dataclasses.dataclass(frozen=True)
class CheckShape:
    """Models, steps and time limits of one flavour of the check (``gpu`` or ``dry``)."""

    measured: dict          # the paper-shaped small MoE (``model:`` keys of a recipe)
    grown_source: dict      # the model growth numerics trains and grows
    micro_batch_size: int
    global_batch_size: int
    train_steps: int
    log_interval: int
    sequential_steps: int
    hf_steps: int
    growth_source_steps: int
    growth_after_steps: int
    grouped_tokens: int     # routed token copies in the grouped-GEMM comparison
    grouped_min_seconds: float  # each of the two variants is timed for this long
    matmul_size: int
    corpus_chars: int | None  # None: the whole corpus
    limits: dict             # phase -> seconds
    budget_s: float          # the whole run, preflight included


PAPER_SMALL = {  # 16 layers, hidden 1024, 64 experts top-6 (the paper's layout, scaled down)
    "num_layers": 16, "hidden_size": 1024, "num_attention_heads": 16, "num_query_groups": 4, "kv_channels": 64,
    "num_moe_experts": 64, "moe_router_topk": 6, "moe_ffn_hidden_size": 512, "vocab_size": 8192,
    "make_vocab_size_divisible_by": 128, "seq_length": 4096, "moe_expert_backend": "grouped_mm",
}
GROWTH_SMALL = {  # grown x2 in depth and in width: 8 layers / 32 experts at most, ~0.3B parameters
    "num_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "num_query_groups": 4, "kv_channels": 64,
    "num_moe_experts": 16, "moe_router_topk": 2, "moe_ffn_hidden_size": 512, "vocab_size": 8192,
    "make_vocab_size_divisible_by": 128, "seq_length": 1024, "moe_expert_backend": "grouped_mm",
}
TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16,
        "num_moe_experts": 8, "moe_router_topk": 2, "moe_ffn_hidden_size": 32, "vocab_size": 512,
        "make_vocab_size_divisible_by": 128, "seq_length": 64, "moe_expert_backend": "grouped_mm"}

SHAPES = {
    "gpu": CheckShape(PAPER_SMALL, GROWTH_SMALL, micro_batch_size=1, global_batch_size=8, train_steps=20,
                      log_interval=5, sequential_steps=8, hf_steps=5, growth_source_steps=30, growth_after_steps=10,
                      grouped_tokens=4096 * 6, grouped_min_seconds=1.0, matmul_size=8192, corpus_chars=None,
                      limits={"grouped_mm": 45, "matmul_ceiling": 30, "data": 90, "growth_numerics": 120,
                              "train": 120, "profile": 45, "transformers": 75, "train_sequential": 75},
                      budget_s=400),
    "dry": CheckShape(TINY, TINY, micro_batch_size=2, global_batch_size=4, train_steps=4, log_interval=2,
                      sequential_steps=2, hf_steps=2, growth_source_steps=3, growth_after_steps=2,
                      grouped_tokens=96, grouped_min_seconds=0.1, matmul_size=128, corpus_chars=200_000,
                      limits={name: 120 for name in PHASES}, budget_s=900),
}


def _say(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# Memory arithmetic: what each model of the check needs on one GPU (shapes are chosen by it).


def memory_estimate(model: dict, micro_batch_size: int) -> dict:
    """Training bytes on one GPU, local spec (unfused attention), bf16 with the distributed optimizer.

    parameters x 18 bytes: bf16 weight 2 + fp32 main grad 4 + fp32 master 4 + Adam m 4 + v 4;
    activations per layer and micro batch: ``activation_elements_per_token x 2 bytes x s x b``
    (``models/params.py``) plus the unfused attention's s x s matrices: scores, masked scores
    and softmax probabilities kept for backward, 3 x 2 bytes x heads x s^2 x b; logits:
    s x b x V x 6 bytes (bf16 logits and their fp32 softmax).
    """
    from megatron_grow.config.schema import ModelConfig
    from megatron_grow.models.params import activation_elements_per_token, count_params

    cfg = ModelConfig(**model)
    s, b = cfg.seq_length, micro_batch_size
    params = count_params(cfg).total
    per_layer = activation_elements_per_token(cfg) * 2 * s * b + 3 * 2 * cfg.num_attention_heads * s * s * b
    out = {"params": params, "state_gib": params * 18 / GIB, "activations_gib": cfg.num_layers * per_layer / GIB,
           "logits_gib": s * b * cfg.vocab_size * 6 / GIB}
    out["total_gib"] = out["state_gib"] + out["activations_gib"] + out["logits_gib"]
    return out


def memory_plan(shape: CheckShape) -> dict:
    """Every model the check builds, the largest grown one included, against an 80 GB H100."""
    grown = dict(shape.grown_source, num_layers=2 * shape.grown_source["num_layers"],
                 num_moe_experts=2 * shape.grown_source["num_moe_experts"],
                 moe_router_topk=2 * shape.grown_source["moe_router_topk"])
    return {"measured": memory_estimate(shape.measured, shape.micro_batch_size),
            "growth_source": memory_estimate(shape.grown_source, shape.micro_batch_size),
            "grown_depth_or_width_x2_bound": memory_estimate(grown, shape.micro_batch_size),
            "h100_gib": 80 * 1e9 / GIB}


# ------------------------------------------------------------------------------------------------
# Preflight (this process; torch only, so a CPU machine is refused in seconds)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


SUPPORTED_PYTHONS = ("3.10", "3.11", "3.12")  # setup.py: >=3.10,<3.13
BUNDLE_LIMIT_MIB = 64  # what one device call carries


def bundle_problems(bundle: str) -> list[str]:
    """What the carried folder lacks for an offline run on an image of any supported Python."""
    problems = []
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(bundle) for f in fs]
    size_mib = sum(os.path.getsize(f) for f in files) / 2 ** 20
    if size_mib > BUNDLE_LIMIT_MIB:
        problems.append(f"{bundle} holds {size_mib:.1f} MiB, more than the {BUNDLE_LIMIT_MIB} MiB one call carries")
    wheels = [os.path.basename(f) for f in glob.glob(os.path.join(bundle, "wheels", "*.whl"))]
    for dist in ("megatron_core", "sentencepiece"):
        for py in SUPPORTED_PYTHONS:
            tag = "cp" + py.replace(".", "")
            if not any(w.startswith(dist + "-") and (f"-{tag}-" in w or "-py3-none-" in w) for w in wheels):
                problems.append(f"no {dist} wheel for Python {py} ({tag}) in {bundle}/wheels")
    data = bundled_data(bundle)
    if data is None:
        problems.append(f"no {bundle}/data/data.json (make it with --prepare {bundle})")
    else:
        for path in (data["tokenizer_model"], data["prefix"] + ".bin", data["prefix"] + ".idx"):
            if not os.path.isfile(path):
                problems.append(f"missing {path}")
    return problems


def grouped_mm_kernel_name() -> str | None:
    """The grouped GEMM the experts will use (as ``models.experts.grouped_mm_kernel`` picks it)."""
    if hasattr(torch.nn.functional, "grouped_mm"):
        return "torch.nn.functional.grouped_mm"
    return "torch._grouped_mm" if hasattr(torch, "_grouped_mm") else None


def preflight(bundle: str | None = None) -> dict:
    """What this machine is and has, before anything is built."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": _cuda(), "megatron_core": _version("megatron-core"),
            "transformers": _version("transformers"), "sentencepiece": _version("sentencepiece"),
            "transformer_engine": _version("transformer_engine") or _version("transformer-engine"),
            "triton": _version("triton") or _version("pytorch-triton"),
            "c_compiler": next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)}
    info["grouped_mm_kernel"] = grouped_mm_kernel_name()
    info["bundle_problems"] = bundle_problems(bundle) if bundle else None
    info["transformer_engine_importable"] = importlib.util.find_spec("transformer_engine") is not None
    if _cuda():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    sms=props.multi_processor_count, mig="MIG" in torch.cuda.get_device_name(0),
                    free_gib=free / GIB, total_gib=total / GIB, gpus=torch.cuda.device_count())
    return info


def preflight_lines(info: dict) -> list[str]:
    gpu = (f"{info['gpu']} sm{''.join(map(str, info['capability']))}, {info['free_gib']:.1f}/{info['total_gib']:.1f} "
           f"GiB free{', MIG slice' if info['mig'] else ''}" if info["cuda_available"] else "no CUDA GPU")
    return [f"python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}), megatron-core "
            f"{info['megatron_core']}, transformers {info['transformers']}",
            f"{gpu}; grouped GEMM {info['grouped_mm_kernel']}; TE {info['transformer_engine']}; "
            f"Triton {info['triton']}; C compiler {info['c_compiler']}"]


# ------------------------------------------------------------------------------------------------
# Phases (each runs in its own process)


def _time_for(fn, min_seconds: float) -> tuple[float, int]:
    """Seconds per call of ``fn``, calling it until ``min_seconds`` have passed (after a warm-up)."""
    fn()
    _sync()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        _sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return elapsed / calls, calls


def grouped_mm_phase(tokens: int, hidden: int, ffn: int, experts: int, min_seconds: float) -> dict:
    """The experts' ``grouped_linear`` against a per-expert loop, bf16 on CUDA (fp32 on CPU), with
    every fourth expert receiving no token: error against an fp32 per-expert reference, and time."""
    from megatron_grow.models.experts import _per_expert_matmuls, grouped_linear

    device, dtype = ("cuda", torch.bfloat16) if _cuda() else ("cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    weights_per = torch.rand(experts, generator=g) * torch.tensor([0.0 if e % 4 == 0 else 1.0 for e in range(experts)])
    counts = (weights_per / weights_per.sum() * tokens).floor().long()
    counts[1] += tokens - counts.sum()
    offsets = counts.cumsum(0).to(device=device, dtype=torch.int32)
    x32 = torch.randn(tokens, hidden, generator=g).to(device)
    w32 = (torch.randn(experts, ffn, hidden, generator=g) / hidden ** 0.5).to(device)
    reference = _per_expert_matmuls(x32, w32, offsets)
    x, w = x32.to(dtype).requires_grad_(), w32.to(dtype).requires_grad_()
    out = {"tokens": tokens, "experts": experts, "empty_groups": int((counts == 0).sum()), "dtype": str(dtype),
           "device": torch.cuda.get_device_name() if _cuda() else "cpu"}
    scale = reference.abs().max().item()
    grad = torch.randn(reference.shape, generator=g).to(device=device, dtype=dtype)  # as the layer above sends it
    for name, fn in (("grouped", grouped_linear), ("loop", _per_expert_matmuls)):
        result = fn(x, w, offsets)
        out[f"{name}_max_rel_error"] = (result.float() - reference).abs().max().item() / scale

        def fwd_bwd(fn=fn):
            fn(x, w, offsets).backward(grad)

        seconds, calls = _time_for(fwd_bwd, min_seconds)
        out[f"{name}_ms"], out[f"{name}_calls"] = seconds * 1e3, calls
    out["grouped_speedup"] = out["loop_ms"] / out["grouped_ms"]
    return out


def matmul_ceiling(size: int, min_seconds: float = 1.0) -> dict:
    """Dense matmul TFLOP/s of this device (bf16 on CUDA, fp32 on CPU), random data, timed for at
    least ``min_seconds`` (launch overhead and clocks settle; ~30 ms says little)."""
    device, dtype = ("cuda", torch.bfloat16) if _cuda() else ("cpu", torch.float32)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    seconds, calls = _time_for(lambda: a @ b, min_seconds)
    return {"tflops": 2 * size ** 3 / seconds / 1e12, "size": size, "dtype": str(dtype), "calls": calls,
            "seconds": seconds * calls, "device": torch.cuda.get_device_name() if _cuda() else "cpu"}


def prepare_corpus(work: str, vocab_size: int, corpus_chars: int | None) -> dict:
    """A sentencepiece tokenizer and MCore indexed dataset of the shipped corpus (the real pipeline)."""
    from megatron_grow.data.preprocess import preprocess
    from megatron_grow.data.tokenizer import train_tokenizer

    os.makedirs(work, exist_ok=True)
    text = CORPUS
    if corpus_chars is not None:
        text = os.path.join(work, "corpus_part.txt")
        with gzip.open(CORPUS, "rt", encoding="utf-8") as f, open(text, "w", encoding="utf-8") as out:
            out.write(f.read(corpus_chars))
    t0 = time.perf_counter()
    cores = max(1, min(16, os.cpu_count() or 1))
    tok = train_tokenizer([text], os.path.join(work, "tok"), vocab_size, num_threads=cores)
    ds = preprocess([text], tok.model_file, os.path.join(work, "corpus"), workers=min(8, cores), append_eod=True,
                    progress=False)
    if corpus_chars is not None:
        os.remove(text)
    return {"tokenizer_model": tok.model_file, "prefix": os.path.join(work, "corpus"), "tokens": ds.tokens,
            "seconds": time.perf_counter() - t0}


def bundled_data(bundle: str | None) -> dict | None:
    """The data the bundle carries (``--prepare``), or None."""
    if not bundle:
        return None
    path = os.path.join(bundle, "data", "data.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rel = json.load(f)
    base = os.path.dirname(path)
    return {k: os.path.join(base, v) if k in ("tokenizer_model", "prefix") else v for k, v in rel.items()}


def write_recipe(path: str, shape: CheckShape, model: dict, data: dict, steps: int, *, save: str | None = None,
                 load: str | None = None, **model_overrides) -> str:
    import yaml

    # The tokenizer decides the vocabulary (a dry run may use the GPU bundle's 8192-token one).
    recipe = {
        "model": {**model, "vocab_size": data.get("vocab_size", model["vocab_size"]), **model_overrides},
        "training": {"micro_batch_size": shape.micro_batch_size, "global_batch_size": shape.global_batch_size,
                     "train_iters": steps, "lr": 1e-3, "min_lr": 1e-4, "lr_decay_style": "constant",
                     "eval_interval": 100_000, "eval_iters": 0, "bf16": True},
        "data": {"data_path": [data["prefix"]], "tokenizer_model": data["tokenizer_model"], "split": "100,0,0"},
        # Weights only: the optimizer state would be ~12 bytes/parameter of disk.
        "checkpoint": {"save": save, "load": load, "save_interval": 100_000, "keep_last": 1, "save_optim": False},
        "logging": {"log_interval": shape.log_interval},
    }
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path


def throughput(model, global_batch_size: int, steps: int, seconds: float, peak_flops: float | None) -> dict:
    """tokens/s, and TFLOP/s and MFU with attention counted both ways: causal (each query sees s/2
    keys on average: the FLOPs a causal kernel needs) and full (every s x s score: what the unfused
    attention computes and what Megatron-LM's MFU counts)."""
    from megatron_grow.training.flops import training_flops_per_step

    out = {"tokens_per_s": global_batch_size * model.seq_length * steps / seconds}
    for kind, causal in (("causal", True), ("full", False)):
        flops = training_flops_per_step(model, global_batch_size, model.seq_length, causal=causal)
        achieved = flops * steps / seconds
        out[f"flops_per_step_{kind}"] = flops
        out[f"tflops_per_gpu_{kind}"] = achieved / 1e12
        out[f"mfu_{kind}"] = achieved / peak_flops if peak_flops else None
    return out


def _train(recipe_path: str, grown_from: str | None = None, use_te: bool | None = False) -> tuple:
    """The trainer as ``megatron-grow train`` runs it (the local spec unless ``use_te``); ``grown_from``
    resumes a grown checkpoint, whose architecture its manifest records."""
    from megatron_grow.checkpoint import paths
    from megatron_grow.checkpoint.manifest import read_checkpoint_info
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.training.trainer import Trainer

    recipe = load_recipe(recipe_path)
    model = recipe.model
    if grown_from:
        recorded = read_checkpoint_info(*paths.resolve_checkpoint_dir(grown_from)).model
        model = dataclasses.replace(recorded, moe_expert_backend=recipe.model.moe_expert_backend)
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    return Trainer(recipe, model=model, use_te=use_te).run(), recipe, model


def train_phase(recipe_path: str, use_te: bool | None = False) -> dict:
    """tokens/s, TFLOP/s, MFU (causal and full) over the steps after the first log interval, peak memory."""
    from megatron_grow.training.peak_flops import current_device_peak

    t0 = time.perf_counter()
    run, recipe, model = _train(recipe_path, use_te=use_te)
    steady = run.intervals[1:] or run.intervals  # the first interval holds warm-up (allocator, autotuning)
    steps, seconds = sum(i["steps"] for i in steady), sum(i["seconds"] for i in steady)
    peak = current_device_peak(recipe.logging.peak_tflops)
    return {"losses": [loss for _, loss in run.train_losses], "iteration": run.iteration, "peak": run.peak,
            "steady_steps": steps, "steady_seconds": seconds, "wall_seconds": time.perf_counter() - t0,
            **throughput(model, recipe.training.global_batch_size, steps, seconds, peak.flops),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB if _cuda() else None,
            "layers": model.num_layers, "experts": model.num_moe_experts, "backend": model.moe_expert_backend}


def growth_numerics_phase(work: str, shape_name: str, data: dict) -> dict:
    """Train the small MoE, then on this device: width x2 with alpha 0 (KL of the logits against the
    source: ~0, the copies are exact) and depth x2 interposition trained on (loss continuity)."""
    from megatron_grow.config.schema import DepthGrowthConfig, GrowthConfig, ParallelConfig, WidthGrowthConfig
    from megatron_grow.growth.grow import grow_checkpoint
    from megatron_grow.growth.verify import verify_growth

    shape = SHAPES[shape_name]
    src_root = os.path.join(work, "growth_src")
    recipe = write_recipe(os.path.join(work, "growth_src.yaml"), shape, shape.grown_source, data,
                          shape.growth_source_steps, save=src_root)
    source, _, _ = _train(recipe)
    src_ckpt = source.last_checkpoint
    width_root, depth_root = os.path.join(work, "grown_width"), os.path.join(work, "grown_depth")
    width = GrowthConfig(order=("width",), width=WidthGrowthConfig(factor=2, alpha=0.0))
    grow_checkpoint(src_ckpt, width_root, width, ParallelConfig(), progress=False, expert_backend="grouped_mm")
    dtype = torch.bfloat16 if _cuda() else torch.float32
    kl = verify_growth(src_root, width_root, ParallelConfig(), params_dtype=dtype)
    depth = GrowthConfig(order=("depth",), depth=DepthGrowthConfig(factor=2, mode="interposition"))
    grow_checkpoint(src_ckpt, depth_root, depth, ParallelConfig(), progress=False, expert_backend="grouped_mm")
    resume = write_recipe(os.path.join(work, "growth_after.yaml"), shape, shape.grown_source, data,
                          source.iteration + shape.growth_after_steps, load=depth_root)
    after, _, _ = _train(resume, grown_from=depth_root)
    before = [loss for _, loss in source.train_losses]
    grown = [loss for _, loss in after.train_losses]
    return {"width_alpha0": {k: kl[k] for k in ("kl_mean", "kl_max", "top1_agreement", "max_abs_logit_diff")
                             if k in kl},
            "verify_dtype": str(dtype),
            "depth_interposition": {"source_losses": before, "grown_losses": grown,
                                    "loss_jump": grown[0] - before[-1] if before and grown else None}}


def profile_phase(recipe_path: str, out_dir: str) -> dict:
    """``torch.profiler`` over one forward+backward of the measured model: top ops by device time."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_grow.config.loader import load_recipe
    from megatron_grow.models.builder import build_gpt_model
    from megatron_grow.models.forward import causal_attention_mask, position_ids_for
    from megatron_grow.parallel.init import initialize_distributed

    recipe = load_recipe(recipe_path)
    m, t = recipe.model, recipe.training
    initialize_distributed(recipe.parallel)
    device = "cuda" if _cuda() else "cpu"
    model = build_gpt_model(m, params_dtype=torch.bfloat16 if _cuda() else torch.float32, use_te=False)
    tokens = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length), device=device)
    mask = causal_attention_mask(m.seq_length, device)

    def step():
        model(tokens, position_ids_for(tokens), mask, labels=tokens).float().mean().backward()

    step()  # warm-up outside the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _cuda() else [])
    with profile(activities=activities) as prof:
        step()
        _sync()
    key = "self_device_time_total" if _cuda() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key.replace("device", "cuda"), row_limit=40)
    path = os.path.join(out_dir, "profile.txt")
    with open(path, "w") as f:
        f.write(f"torch.profiler, one forward+backward of {t.micro_batch_size} x {m.seq_length}, by {key}\n\n"
                f"{table}\n")
    events = prof.key_averages()
    total = sum(getattr(e, key, 0) for e in events) or 1
    top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:8]
    return {"table": path, "top": [(e.key, round(100 * getattr(e, key, 0) / total, 1)) for e in top]}


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
    from transformers import Qwen3MoeForCausalLM

    from megatron_grow.config.layout_rules import padded_vocab_size
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.data.datasets import build_datasets, make_batch_iterator
    from megatron_grow.data.tokenizer import load_tokenizer
    from megatron_grow.parallel.init import initialize_distributed
    from megatron_grow.training.peak_flops import current_device_peak

    recipe = load_recipe(recipe_path)
    m, t = recipe.model, recipe.training
    initialize_distributed(recipe.parallel)
    device, dtype = ("cuda", torch.bfloat16) if _cuda() else ("cpu", torch.float32)
    config = hf_qwen3_moe_config(dataclasses.asdict(m), padded_vocab_size(m))
    # Equal terms: MCore's local spec computes attention unfused (the full s x s scores), so this
    # side does too; transformers' default SDPA would compare attention kernels, not the stacks.
    config._attn_implementation = "eager"
    with torch.device(device):  # initialise on the device: a CPU init of the full model takes minutes
        model = Qwen3MoeForCausalLM(config).to(dtype=dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr)
    datasets = build_datasets(recipe.data, m, t, load_tokenizer(recipe.data.tokenizer_model))
    batches = make_batch_iterator(datasets.train, 0, t.micro_batch_size, 0, 1)
    accumulation = t.global_batch_size // t.micro_batch_size
    times, losses = [], []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        for _ in range(accumulation):
            batch = next(batches)
            logits = model(input_ids=batch["tokens"].to(device)).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]),
                                                     batch["labels"].to(device).view(-1))
            (loss / accumulation).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    steady = times[1:] or times
    return {**throughput(m, t.global_batch_size, len(steady), sum(steady), current_device_peak(None).flops),
            "losses": losses, "steps": steps, "transformers_class": type(model).__name__,
            "attn_implementation": str(getattr(config, "_attn_implementation", "default"))}


# ------------------------------------------------------------------------------------------------
# Orchestration: one fresh process per phase, its JSON written the moment it ends


class Check:
    """The phases of one run and where their numbers go."""

    def __init__(self, out: str, shape_name: str, bundle: str | None, limits: dict, dry_run: bool,
                 work: str):
        self.out, self.shape_name, self.shape = out, shape_name, SHAPES[shape_name]
        self.work = work
        self.limits, self.dry_run = {**self.shape.limits, **limits}, dry_run
        self.started = time.perf_counter()
        self.results: dict = {"dry_run": dry_run, "shape": dataclasses.asdict(self.shape),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.data = bundled_data(bundle)
        self.index = 0

    def record(self, name: str, result: dict) -> None:
        """``phases/NN_name.json`` and the summary, written now (atomically: a kill leaves old or new)."""
        self.results[name] = result
        self.results["wall_seconds"] = time.perf_counter() - self.started
        _write_json(os.path.join(self.out, "phases", f"{self.index:02d}_{name}.json"), result)
        self.index += 1
        _write_json(os.path.join(self.out, "summary.json"), {**self.results, "comparison": compare(self.results)})
        _write_text(os.path.join(self.out, "summary.md"), summary_table(self.results) + "\n")

    def run(self, name: str, fn, *args) -> dict:
        remaining = self.shape.budget_s - (time.perf_counter() - self.started)
        limit = min(self.limits[name], remaining)
        if remaining < 1:
            out = {"ok": False, "error": f"not run: the whole check's budget of {self.shape.budget_s:.0f}s is spent"}
            self.record(name, out)
            return out
        _say(f"{name} (limit {limit:.3g}s) ...")
        t0 = time.perf_counter()
        try:
            out = {"ok": True, **run_in_processes(fn, 1, args, timeout=limit)[0]}
        except Exception as e:  # recorded; the remaining phases still run
            out = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-3000:]}"}
        out["phase_seconds"] = time.perf_counter() - t0
        _say(f"{name}: {'ok' if out['ok'] else 'FAILED: ' + out['error'].strip().splitlines()[-1][:200]} "
             f"in {out['phase_seconds']:.1f}s")
        self.record(name, out)
        return out


def _write_json(path: str, value) -> None:
    _write_text(path, json.dumps(value, indent=1, default=str))


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_phases(check: Check, only: tuple) -> None:
    s, work = check.shape, check.work
    os.makedirs(work, exist_ok=True)
    wanted = [p for p in PHASES if p in only]
    measured = dict(s.measured)
    if "grouped_mm" in wanted:
        check.run("grouped_mm", grouped_mm_phase, s.grouped_tokens, measured["hidden_size"],
                  2 * measured["moe_ffn_hidden_size"], measured["num_moe_experts"], s.grouped_min_seconds)
    if "matmul_ceiling" in wanted:
        check.run("matmul_ceiling", matmul_ceiling, s.matmul_size, 1.0)
    if check.data is None and any(p in wanted for p in NEEDS_DATA):
        data = check.run("data", prepare_corpus, os.path.join(work, "data"), measured["vocab_size"], s.corpus_chars)
        check.data = ({"tokenizer_model": data["tokenizer_model"], "prefix": data["prefix"],
                       "vocab_size": measured["vocab_size"]} if data["ok"] else None)
    if check.data is None:
        for name in (p for p in wanted if p in NEEDS_DATA):
            check.record(name, {"ok": False, "error": "not run: no data (the data phase failed)"})
        return
    d = check.data
    recipe = write_recipe(os.path.join(work, "measured.yaml"), s, measured, d, s.train_steps)
    if "growth_numerics" in wanted:
        check.run("growth_numerics", growth_numerics_phase, work, check.shape_name, d)
    if "train" in wanted:
        check.run("train", train_phase, recipe)
    if "profile" in wanted:
        check.run("profile", profile_phase, recipe, check.out)
    if "transformers" in wanted:
        check.run("transformers", hf_phase, recipe, s.hf_steps)
    if "train_sequential" in wanted:
        seq = write_recipe(os.path.join(work, "sequential.yaml"), s, measured, d, s.sequential_steps,
                           moe_expert_backend="sequential")
        check.run("train_sequential", train_phase, seq)


def compare(results: dict) -> dict:
    """The ratios the issue asks for, from the phases that ran."""
    out = {}
    train, hf, seq = (results.get(k, {}) for k in ("train", "transformers", "train_sequential"))
    ceiling = results.get("matmul_ceiling", {})
    if train.get("ok") and ceiling.get("ok"):
        for kind in ("causal", "full"):
            out[f"mfu_{kind}_vs_measured_matmul"] = train[f"tflops_per_gpu_{kind}"] / ceiling["tflops"]
    if train.get("ok"):
        out["peak_used"] = train.get("peak")
    if train.get("ok") and hf.get("ok"):
        out["tokens_per_s_vs_transformers"] = train["tokens_per_s"] / hf["tokens_per_s"]
    if train.get("ok") and seq.get("ok"):
        out["grouped_mm_vs_sequential_same_spec"] = train["tokens_per_s"] / seq["tokens_per_s"]
    return out


def _figures(name: str, r: dict) -> str:
    if not r["ok"]:
        return (r["error"].strip().splitlines() or ["failed"])[-1][:120]
    if "tokens_per_s" in r:
        mfu = "".join(f", MFU {kind} {r[f'mfu_{kind}']:.1%}" for kind in ("causal", "full")
                      if r.get(f"mfu_{kind}") is not None)
        mem = f", peak {r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") else ""
        return (f"{r['tokens_per_s']:,.0f} tok/s, {r['tflops_per_gpu_causal']:.1f} (causal) / "
                f"{r['tflops_per_gpu_full']:.1f} (full) TFLOP/s{mfu}{mem}")
    if name == "matmul_ceiling":
        return f"{r['tflops']:.4g} TFLOP/s ({r['dtype']}, {r['size']}^3 x {r['calls']}, {r['seconds']:.1f}s)"
    if name == "grouped_mm":
        return (f"grouped {r['grouped_ms']:.2f} ms vs loop {r['loop_ms']:.2f} ms (x{r['grouped_speedup']:.2f}); "
                f"rel. error {r['grouped_max_rel_error']:.1e} vs {r['loop_max_rel_error']:.1e}; "
                f"{r['empty_groups']} empty groups")
    if name == "growth_numerics":
        w, dp = r["width_alpha0"], r["depth_interposition"]
        return (f"width alpha 0: KL {w.get('kl_mean', float('nan')):.2e} (max {w.get('kl_max', float('nan')):.2e}); "
                f"depth: loss {dp['source_losses'][-1]:.3f} -> {dp['grown_losses'][0]:.3f} .. "
                f"{dp['grown_losses'][-1]:.3f}")
    if name == "data":
        return f"{r['tokens']:,} tokens in {r['seconds']:.1f}s"
    return ", ".join(f"{k} {v}%" for k, v in r.get("top", [])[:3])


def summary_table(results: dict) -> str:
    lines = [f"GPU check of {results['started']}" + (" (dry run)" if results.get("dry_run") else ""), "",
             "| phase | ok | seconds | figures |", "|---|---|---|---|"]
    for name in PHASES:
        r = results.get(name)
        if r is not None:
            seconds = f"{r['phase_seconds']:.1f}" if "phase_seconds" in r else "-"
            lines.append(f"| {name} | {'yes' if r['ok'] else 'NO'} | {seconds} | {_figures(name, r)} |")
    lines.append("")
    for key, value in compare(results).items():
        lines.append(f"- {key}: {value:.3f}" if isinstance(value, float) else f"- {key}: {value}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Entry


def clear_stale(out: str) -> None:
    """An earlier run's files must not be read as this run's."""
    for name in STALE:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)
    for path in glob.glob(os.path.join(out, "phases", "*.json")):
        os.remove(path)


def prepare_bundle(bundle: str, shape: CheckShape) -> int:
    """On CPU, beforehand: the tokenizer and indexed dataset the check trains on, under BUNDLE/data."""
    cpu.apply_cpu_adaptations()
    data = prepare_corpus(os.path.join(bundle, "data"), shape.measured["vocab_size"], shape.corpus_chars)
    base = os.path.join(bundle, "data")
    _write_json(os.path.join(base, "data.json"), {"tokenizer_model": os.path.relpath(data["tokenizer_model"], base),
                                                  "prefix": os.path.relpath(data["prefix"], base),
                                                  "tokens": data["tokens"], "vocab_size": shape.measured["vocab_size"]})
    _say(f"data for the check in {base}: {data['tokens']:,} tokens ({data['seconds']:.0f}s)")
    return 0


class BadArgument(Exception):
    """One line for the user, exit code 2."""


def _parse_limits(items: list) -> dict:
    limits = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in PHASES or not seconds.replace(".", "", 1).isdigit():
            raise BadArgument(f"--phase-limit wants PHASE=SECONDS with PHASE one of {', '.join(PHASES)}, "
                              f"got {item!r}")
        limits[name] = float(seconds)
    return limits


def _parse_phases(text: str) -> tuple:
    only = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in only if p not in PHASES]
    if unknown:
        raise BadArgument(f"unknown phase(s) {', '.join(unknown)}; the phases are {', '.join(PHASES)}")
    return only


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for phases/, summary.json, summary.md, profile.txt")
    ap.add_argument("--work", help="scratch folder for data and checkpoints, emptied first (default: OUT/work "
                    "with --dry-run, else TMPDIR/megatron_grow_check_work)")
    ap.add_argument("--bundle", help="the carried folder (wheels/, data/) made beforehand on CPU")
    ap.add_argument("--prepare", metavar="BUNDLE", help="make BUNDLE/data on this (CPU) machine and stop")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, few steps (runs on CPU)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of the phases")
    ap.add_argument("--phase-limit", action="append", default=[], metavar="PHASE=SECONDS",
                    help="override one phase's time limit")
    args = ap.parse_args(argv)
    shape_name = "dry" if args.dry_run else "gpu"
    if args.prepare:
        return prepare_bundle(args.prepare, SHAPES[shape_name])
    try:
        if not args.out:
            raise BadArgument("--out DIR is required")
        only, limits = _parse_phases(args.phases), _parse_limits(args.phase_limit)
    except BadArgument as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    clear_stale(args.out)
    info = preflight(args.bundle)
    _write_json(os.path.join(args.out, "preflight.json"), info)
    for line in preflight_lines(info):
        _say(line)
    if not info["cuda_available"] and not args.dry_run:
        print(f"gpu-check: no CUDA GPU on this machine (torch {info['torch']}, torch.version.cuda "
              f"{info['cuda']}, torch.cuda.is_available() False): nothing measured", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return run_check(args, shape_name, only, limits, info)


def run_check(args, shape_name: str, only: tuple, limits: dict, info: dict) -> int:
    cpu.apply_cpu_adaptations()  # an entry point (a no-op with CUDA but for the TE-absent workaround)
    # Checkpoints and data of the phases: outside --out on a GPU (the device call copies --out back,
    # and hundreds of MB there could keep anything from coming back); emptied first, since a trainer
    # finding an earlier run's checkpoint under its save folder would resume it instead of training.
    work = args.work or (os.path.join(args.out, "work") if args.dry_run
                         else os.path.join(tempfile.gettempdir(), "megatron_grow_check_work"))
    shutil.rmtree(work, ignore_errors=True)
    check = Check(args.out, shape_name, args.bundle, limits, args.dry_run, work)
    check.results["preflight"] = info
    check.results["memory_plan"] = memory_plan(check.shape)
    plan = check.results["memory_plan"]
    _say("memory plan (GiB, 18 bytes/parameter + activations): " + ", ".join(
        f"{k} {v['total_gib']:.1f}" for k, v in plan.items() if isinstance(v, dict)))
    run_phases(check, only)
    check.results["wall_seconds"] = time.perf_counter() - check.started
    check.record("done", {"ok": True, "wall_seconds": check.results["wall_seconds"]})
    print(summary_table(check.results), flush=True)
    failed = [k for k, v in check.results.items() if isinstance(v, dict) and v.get("ok") is False]
    if info.get("bundle_problems"):
        failed.append("bundle (" + "; ".join(info["bundle_problems"]) + ")")
    _say(f"done in {check.results['wall_seconds']:.0f}s; " + (f"FAILED or not run: {', '.join(failed)}" if failed
                                                               else "every phase ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
