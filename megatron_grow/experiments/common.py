"""What the demo and the reproduction share: sizes, data preparation, recipe sections, the bodies
run on every rank, process spawning, and small helpers for curves and summaries.

Every run is an ordinary recipe (written under ``WORKDIR/recipes/``, accepted unchanged by
``megatron-grow train``), trained by the public :class:`~megatron_grow.training.trainer.Trainer`
and grown by :func:`~megatron_grow.growth.grow.grow_checkpoint`. All runs of one experiment set
``data.eval_samples`` to the samples one evaluation reads, so each is evaluated on the same
validation tokens whatever its ``train_iters`` (the bodies record a SHA-256 of those token ids).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import yaml

from megatron_grow.checkpoint import paths
from megatron_grow.checkpoint.manifest import read_checkpoint_info
from megatron_grow.config.loader import load_recipe, recipe_to_dict
from megatron_grow.config.schema import ModelConfig, Recipe
from megatron_grow.data.preprocess import preprocess
from megatron_grow.data.tokenizer import train_tokenizer
from megatron_grow.growth.grow import grow_checkpoint
from megatron_grow.growth.grown_model import grown_model_of
from megatron_grow.growth.verify import format_metrics, verify_growth
from megatron_grow.models.params import count_params
from megatron_grow.parallel.spawn import run_in_processes
from megatron_grow.training.checkpointing import has_checkpoint
from megatron_grow.training.flops import training_flops_per_step
from megatron_grow.training.trainer import Trainer

REPO_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "data", "corpus", "kjv.txt.gz")


@dataclass(frozen=True)
class ExperimentSize:
    """Everything an experiment chooses: the base architecture, batch and step counts."""

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
    base_iters: int        # steps of the base (constant LR)
    grown_iters: int       # steps after growth (grown and scratch alike)
    eval_interval: int
    eval_iters: int
    lr: float
    vocab_size: int = 512

    @property
    def eval_samples(self) -> int:
        """Validation samples one evaluation reads (the fixed validation set of every run)."""
        return self.eval_iters * self.global_batch_size


def pick_size(sizes: dict, size: str, ci_name: str, ci: bool):
    """``sizes[ci_name]`` when ``ci`` (the CI flag), else ``sizes[size]``; "auto" is gpu with CUDA, else cpu."""
    if ci:
        return sizes[ci_name]
    if size == "auto":
        size = "gpu" if torch.cuda.is_available() else "cpu"
    choices = [name for name in sizes if name != ci_name]
    if size not in choices:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(choices)}, auto")
    return sizes[size]


def default_ranks(size: ExperimentSize) -> int:
    if torch.cuda.is_available() and size.name == "gpu":
        return torch.cuda.device_count()
    return max(1, min(2, os.cpu_count() or 1))


def resolve_texts(texts: Sequence[str] | None) -> list[str]:
    """Absolute paths of the corpus files (default: the shipped KJV Bible); FileNotFoundError naming one missing."""
    paths = [os.path.abspath(t) for t in (texts or [REPO_CORPUS])]
    for t in paths:
        if not os.path.isfile(t):
            raise FileNotFoundError(f"--text {t}: no such file")
    return paths


def load_average() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ------------------------------------------------------------------------------------------------
# Data


def prepare_data(workdir: str, texts: Sequence[str], vocab_size: int, say=print) -> dict:
    """Tokenizer + indexed dataset under WORKDIR/data (each skipped when its output exists)."""
    workers = max(1, min(2, os.cpu_count() or 1))
    data_dir = os.path.join(workdir, "data")
    os.makedirs(data_dir, exist_ok=True)
    # A different text set or vocabulary gets its own files, so a stale dataset is never reused.
    key = hashlib.sha1(json.dumps([[os.path.abspath(t), os.path.getsize(t)] for t in texts]
                                  + [vocab_size]).encode()).hexdigest()[:8]
    tok_prefix = os.path.join(data_dir, f"tok{vocab_size}_{key}")
    ds_prefix = os.path.join(data_dir, f"corpus_{key}")
    t0 = time.perf_counter()
    if os.path.isfile(tok_prefix + ".model"):
        say(f"tokenizer {tok_prefix}.model exists, skipping")
    else:
        s = train_tokenizer(list(texts), tok_prefix, vocab_size, num_threads=workers)
        say(f"trained a {s.vocab_size}-piece {s.model_type} tokenizer in {s.seconds:.1f}s -> {s.model_file}")
    tokens = None
    if os.path.isfile(ds_prefix + ".bin") and os.path.isfile(ds_prefix + ".idx"):
        say(f"dataset {ds_prefix}.bin/.idx exists, skipping")
    else:
        s = preprocess(list(texts), tok_prefix + ".model", ds_prefix, workers=workers, append_eod=True,
                       progress=False)
        tokens = s.tokens
        say(f"tokenized {s.documents} documents, {s.tokens:,} tokens in {s.seconds:.1f}s -> {ds_prefix}")
    return {"tokenizer_model": tok_prefix + ".model", "prefix": ds_prefix, "tokens": tokens,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# Recipes


def base_model_section(size: ExperimentSize) -> dict:
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


def parallel_section(size: ExperimentSize, ranks: int) -> dict:
    """EP over all ranks when the base's experts allow it (the MoE layout), else plain DP."""
    ep = ranks if size.num_moe_experts % ranks == 0 else 1
    return {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": ep}


def training_section(size: ExperimentSize, seed: int = 1234) -> dict:
    """The ``training:`` section without ``train_iters``: constant LR, no warmup."""
    return {
        "micro_batch_size": size.micro_batch_size, "global_batch_size": size.global_batch_size,
        "lr": size.lr, "min_lr": size.lr, "lr_decay_style": "constant", "lr_warmup_iters": 0,
        "eval_interval": size.eval_interval, "eval_iters": size.eval_iters, "bf16": size.name == "gpu",
        "seed": seed,
    }


def common_sections(size: ExperimentSize, ranks: int, data: dict) -> dict:
    """The ``parallel:``, ``data:`` and ``logging:`` sections every run of an experiment shares. The
    validation set is fixed (``eval_samples``): every run sees the same validation tokens."""
    return {
        "parallel": parallel_section(size, ranks),
        "data": {"data_path": [data["prefix"]], "tokenizer_model": data["tokenizer_model"], "split": "98,2,0",
                 "eval_samples": size.eval_samples},
        "logging": {"log_interval": max(1, size.eval_interval // 2)},
    }


def scratch_model_section(model: ModelConfig) -> dict:
    """A ``model:`` section that builds ``model`` (e.g. a grown architecture trained from scratch)."""
    return recipe_to_dict(model)


def write_recipe(recipe_dir: str, name: str, raw: dict) -> tuple[Recipe, str]:
    """Validate ``raw`` (before anything runs) and write it as RECIPE_DIR/NAME.yaml."""
    recipe = load_recipe(raw=raw)
    os.makedirs(recipe_dir, exist_ok=True)
    path = os.path.join(recipe_dir, f"{name}.yaml")
    write_recipe_file(path, raw)
    return recipe, path


def write_recipe_file(path: str, raw: dict) -> None:
    """``raw`` as YAML at ``path``, unvalidated (for a recipe naming a file an earlier step writes)."""
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)


# ------------------------------------------------------------------------------------------------
# Bodies run on every rank (module level, so that spawned processes can import them)


def token_digest(token_ids: torch.Tensor) -> str:
    return hashlib.sha256(token_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def evaluate_start(recipe: Recipe, model: ModelConfig) -> tuple[float | None, str]:
    """Validation loss of the weights a run starts from (the checkpoint under ``checkpoint.load``, or
    random init) with the trainer's own evaluation, and the SHA-256 of the validation token ids it
    read. The run itself then builds a fresh trainer (re-seeded, as ``megatron-grow train`` is)."""
    trainer = Trainer(recipe, model=model)
    trainer.build()
    if has_checkpoint(recipe.checkpoint.load):
        trainer.load_weights(recipe.checkpoint.load)
    trainer.build_data()
    return trainer.evaluate(), token_digest(trainer.validation_token_ids())


def train_phase_body(recipe_path: str) -> dict:
    """``megatron-grow train --config recipe_path`` (resume-aware), plus a validation at the start."""
    recipe = load_recipe(recipe_path)
    model = recipe.model
    start_counters = None
    if has_checkpoint(recipe.checkpoint.load):
        if recipe.growth is not None:  # the output of an offline grow: the weights are the grown model's
            model = grown_model_of(recipe.checkpoint.load, recipe.model, recipe.growth)
        start_counters = dict(read_checkpoint_info(*paths.resolve_checkpoint_dir(recipe.checkpoint.load)).counters)
    elif recipe.growth is not None:
        raise RuntimeError(f"{recipe_path}: the grown checkpoint is missing under {recipe.checkpoint.load}")
    start_loss, valid_digest = evaluate_start(recipe, model)
    run = Trainer(recipe, model=model).run()
    return {"exit_code": run.exit_code, "iteration": run.iteration, "train_losses": run.train_losses,
            "valid_losses": run.valid_losses, "counters": run.counters, "last_checkpoint": run.last_checkpoint,
            "start_loss": start_loss, "start_counters": start_counters, "valid_tokens_sha256": valid_digest}


def grow_body(source: str, grown: str, recipe_path: str, verify: bool = True, progress: bool = True) -> dict:
    """``megatron-grow grow --load source --save grown --recipe recipe_path`` (with its --verify)."""
    t0 = time.perf_counter()
    recipe = load_recipe(recipe_path)
    summary = grow_checkpoint(source, grown, recipe.growth, recipe.parallel, recipe_dict=recipe_to_dict(recipe),
                              overwrite=True, seed=recipe.training.seed, progress=progress)
    out = {"summary": summary}
    if verify:
        out["verify"] = verify_growth(source, grown, recipe.parallel)
        if torch.distributed.get_rank() == 0:
            print(format_metrics(out["verify"]), flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------------
# Orchestration helpers


@contextlib.contextmanager
def library_warnings_ignored():
    """Library warnings (no TE/apex on CPU, deprecations) off in processes started inside: the filter
    is read at interpreter start-up, so children inherit it from this process's environment."""
    saved = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = saved


def spawn(fn, ranks: int, args: tuple, timeout: float, filter_warnings: bool = True) -> dict:
    """``fn(*args)`` in ``ranks`` fresh processes (gloo on CPU, NCCL on GPU), one thread each; rank 0's
    result. ``filter_warnings=False`` when the caller holds :func:`library_warnings_ignored` itself
    (e.g. around several spawns in threads)."""
    with library_warnings_ignored() if filter_warnings else contextlib.nullcontext():
        results = run_in_processes(fn, ranks, args, timeout=timeout, threads_per_rank=1, env={"OMP_NUM_THREADS": "1"})
    return results[0]


def check_run(name: str, run: dict) -> None:
    if run["exit_code"] != 0:
        raise RuntimeError(f"the {name} run exited with code {run['exit_code']}")
    if not run["valid_losses"]:
        raise RuntimeError(f"the {name} run recorded no validation loss (nothing to train? delete its checkpoint)")


def check_same_validation(runs: dict) -> str:
    """The one validation-token digest every run recorded; RuntimeError naming the runs that differ."""
    digests = {name: run["valid_tokens_sha256"] for name, run in runs.items()}
    if len(set(digests.values())) != 1:
        raise RuntimeError("runs were evaluated on different validation tokens: "
                           + ", ".join(f"{n} {d[:12]}" for n, d in digests.items()))
    return next(iter(digests.values()))


def interpolate(points: list, x: float) -> float | None:
    """Loss at ``x`` by linear interpolation over (x, loss) points sorted by x; None outside."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def model_summary(model: ModelConfig, gbs: int, seq: int) -> dict:
    return {"params": count_params(model).as_dict(), "layers": model.num_layers,
            "experts": model.num_moe_experts, "topk": model.moe_router_topk,
            "flops_per_step": training_flops_per_step(model, gbs, seq)}


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON; dataclasses (e.g. a ``ModelConfig`` in a grow summary) as their fields."""
    def plain(o):
        return dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)

    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=plain)
