"""Test bodies that run inside gloo processes (module-level so ``spawn`` can import them)."""

from __future__ import annotations

import dataclasses

import torch

from megatron_grow.checkpoint import io, paths
from megatron_grow.config.schema import ModelConfig, ParallelConfig
from megatron_grow.models.builder import build_gpt_model, build_model_chunks
from megatron_grow.models.forward import forward_logits
from megatron_grow.parallel.init import initialize_distributed


def tiny_model(**overrides) -> ModelConfig:
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, vocab_size=256,
                make_vocab_size_divisible_by=128, seq_length=32)
    base.update(overrides)
    return ModelConfig(**base)


def probe_batches(model: ModelConfig, n_micro: int = 2, micro_batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.vocab_size, (micro_batch, model.seq_length), generator=g)
            for _ in range(n_micro)]


def _last_stage_result(logits, losses):
    from megatron.core import parallel_state as ps

    if logits is None or ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0:
        return None
    return {"logits": logits, "losses": losses}


def test_manifest(model: ModelConfig) -> dict:
    from megatron_grow.checkpoint.manifest import build_manifest

    counters = {"iteration": 1, "consumed_samples": 16, "consumed_tokens": 16 * model.seq_length,
                "flops_so_far": 1.5e12, "sunk_flops": 0}
    return build_manifest(model=model, layout={}, counters=counters, lineage=[])


def build_save_forward(model: ModelConfig, parallel: ParallelConfig, root: str, seed: int = 1234):
    """Build a freshly initialised model in ``parallel``, save it to ``root``, return its logits."""
    initialize_distributed(parallel, seed=seed)
    chunks = build_model_chunks(model, parallel)
    io.save_checkpoint(root, 1, io.model_sharded_state_dict(chunks), test_manifest(model))
    batches = probe_batches(model)
    return _last_stage_result(*forward_logits(chunks, batches, labels=batches))


def build_save_with_nan(model: ModelConfig, parallel: ParallelConfig, saves: list) -> None:
    """For each ``(root, parameter name fragment)``: a fresh model whose first matching parameter
    has one NaN element, saved by the real save (a checkpoint as a diverged run would leave it)."""
    initialize_distributed(parallel, seed=1234)
    for root, fragment in saves:
        chunks = build_model_chunks(model, parallel)
        named = dict(chunks[0].named_parameters())
        matching = [n for n in named if fragment in n]
        assert matching, f"no parameter name contains {fragment!r}: {sorted(named)}"
        param = named[matching[0]]
        with torch.no_grad():
            param.view(-1)[0] = float("nan")
        io.save_checkpoint(root, 1, io.model_sharded_state_dict(chunks), test_manifest(model))


def load_forward(model: ModelConfig, parallel: ParallelConfig, root: str, resave_root: str | None = None):
    """Build in ``parallel``, load the checkpoint under ``root``, return logits (and optionally re-save)."""
    initialize_distributed(parallel, seed=99)  # a different init seed: everything must come from the load
    chunks = build_model_chunks(model, parallel)
    ckpt, _ = paths.resolve_checkpoint_dir(root)
    io.load_checkpoint(ckpt, io.model_sharded_state_dict(chunks))
    if resave_root:
        io.save_checkpoint(resave_root, 1, io.model_sharded_state_dict(chunks), test_manifest(model))
    batches = probe_batches(model)
    return _last_stage_result(*forward_logits(chunks, batches, labels=batches))


def first_result(results):
    found = [r for r in results if r is not None]
    assert found, "no rank returned last-stage logits"
    return found[0]


def replace(cfg, **kw):
    return dataclasses.replace(cfg, **kw)


def grow_body(source_root: str, grown_root: str, growth, parallel: ParallelConfig):
    """Offline growth of ``source_root`` into ``parallel`` (collective)."""
    from megatron_grow.growth.grow import grow_checkpoint

    return grow_checkpoint(source_root, grown_root, growth, parallel, progress=False)


def plain_tensors(ckpt_root: str) -> dict:
    """Every stored tensor of a checkpoint, whole (one process with a 1-rank gloo group)."""
    from megatron.core import dist_checkpointing

    initialize_distributed(ParallelConfig())
    ckpt, _ = paths.resolve_checkpoint_dir(ckpt_root)
    return {k: v.clone() for k, v in dist_checkpointing.load_plain_tensors(ckpt).items()
            if isinstance(v, torch.Tensor)}


def plain_tensors_of_many(ckpt_roots: list) -> list:
    """``plain_tensors`` for several checkpoints in one process."""
    return [plain_tensors(root) for root in ckpt_roots]


def oracle_vs_sharded(source_root: str, grown_root: str, growth) -> dict:
    """Grow the source model's plain state dict with the oracle; load the grown checkpoint into a
    1-process model; return both state dicts (tensors only)."""
    from megatron_grow.checkpoint.manifest import read_checkpoint_info
    from megatron_grow.growth.plan import make_growth_plan
    from megatron_grow.growth.reference import grow_state_dict

    initialize_distributed(ParallelConfig())
    src_dir, it = paths.resolve_checkpoint_dir(source_root)
    src_model = read_checkpoint_info(src_dir, it).model
    plan = make_growth_plan(src_model, growth)
    source = build_gpt_model(src_model)
    io.load_checkpoint(src_dir, io.model_sharded_state_dict([source]))
    oracle = grow_state_dict(source.state_dict(), plan)
    grown = build_gpt_model(plan.target)
    io.load_checkpoint(paths.resolve_checkpoint_dir(grown_root)[0], io.model_sharded_state_dict([grown]))
    sharded = grown.state_dict()
    keep = lambda sd: {k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    return {"oracle": keep(oracle), "sharded": keep(sharded)}


def train_body(recipe_path: str, overrides: list, grow_from: str | None = None):
    """Run the trainer (as ``megatron-grow train`` would) and return its RunResult fields."""
    import argparse

    from megatron_grow.cli import _grow_from

    result = {}
    args = argparse.Namespace(config=recipe_path, grow_from=grow_from, source_config=None, overrides=list(overrides))
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.training.trainer import Trainer

    recipe = load_recipe(recipe_path, overrides)
    model, initialize = recipe.model, None
    if grow_from:
        model, initialize = _grow_from.growth_initializer(args, recipe)
    run = Trainer(recipe, model=model, initialize=initialize).run()
    result.update(exit_code=run.exit_code, iteration=run.iteration, train_losses=run.train_losses,
                  valid_losses=run.valid_losses, counters=run.counters, last_checkpoint=run.last_checkpoint)
    return result


def train_sequence(runs: list):
    """Several trainer runs one after another in the same processes: [(recipe, overrides), ...].

    Each run builds a new Trainer (new model, optimizer and data iterators); state crosses runs
    only through the checkpoint on disk, as it does across jobs.
    """
    return [train_body(recipe, overrides) for recipe, overrides in runs]


def _sigterm_self_once_saved(run_dir: str) -> None:
    """Background thread: SIGTERM this process as soon as a checkpoint tracker appears in ``run_dir``
    (the trainer then saves at the end of the step in progress and exits with code 3)."""
    import os
    import signal
    import threading
    import time

    tracker = os.path.join(run_dir, paths.TRACKER_FILENAME)

    def watch():
        while not os.path.exists(tracker):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def train_straight_then_preempted(straight: str, split: str, split_dir: str):
    """The straight run, then the same recipe preempted by SIGTERM after its first save, then resumed
    (a new Trainer each time; state crosses only through the checkpoint on disk)."""
    first = train_body(straight, [])
    _sigterm_self_once_saved(split_dir)
    part1 = train_body(split, [])
    part2 = train_body(split, [])
    return first, part1, part2


def strict_load_into_nan_model(model_cfg, ckpt_root: str, parallel, params_dtype=torch.float32) -> dict:
    """Megatron-Core's own strict load (``RAISE_ALL``) of a checkpoint into a NaN-filled model of
    ``model_cfg``: its parameters and expert biases by name, so a caller sees anything left unfilled."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    initialize_distributed(parallel)
    (model,) = build_model_chunks(model_cfg, parallel, initialize=False, params_dtype=params_dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    ckpt, _ = paths.resolve_checkpoint_dir(ckpt_root)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), ckpt, strict=StrictHandling.RAISE_ALL)
    # ``loaded`` also holds the common state (``args``, ``iteration``...): the tensors by name.
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if n.endswith("expert_bias")})
    with torch.no_grad():
        for name, t in tensors.items():
            t.copy_(loaded[name])
    return tensors
