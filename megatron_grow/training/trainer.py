"""The training loop on Megatron-Core: one recipe, any TP/PP/EP/DP layout, CPU or GPU.

Each iteration takes ``global_batch_size`` samples as ``num_microbatches`` micro batches per
data-parallel rank through MCore's forward-backward function (PP schedules included),
steps MCore's optimizer and LR schedule, and accounts FLOPs. Checkpoints are written every
``checkpoint.save_interval`` steps, at the end, and when SIGTERM/SIGUSR1 arrive (then the
run exits with :data:`EXIT_PREEMPTED` so a SLURM script can requeue it). A NaN/Inf loss
stops the run with a clear message and leaves the last good checkpoint in place.

Where the weights come from, in order: a checkpoint under ``checkpoint.load`` (resume), or an
``initialize`` callback (the CLI's ``--grow-from`` passes growth-on-load here), or MCore's
random init.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_grow.config.schema import ModelConfig, Recipe
from megatron_grow.errors import TrainingError
from megatron_grow.parallel.preemption import pending_signal

EXIT_PREEMPTED = 3  # saved after SIGUSR1/SIGTERM; the launcher may requeue
H100_BF16_PEAK_FLOPS = 989e12


@dataclass
class RunResult:
    exit_code: int = 0
    iteration: int = 0
    train_losses: list = field(default_factory=list)   # (iteration, loss)
    valid_losses: list = field(default_factory=list)   # (iteration, loss, flops_so_far)
    counters: dict = field(default_factory=dict)
    last_checkpoint: str | None = None


class _SignalFlag:
    """Remembers SIGTERM/SIGUSR1; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.signum = pending_signal()  # one that arrived during start-up counts too
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use)
                pass

    def _handle(self, signum, frame):
        self.signum = signum

    def any_rank(self) -> bool:
        flag = torch.tensor([1 if self.signum else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _rank0() -> bool:
    return torch.distributed.get_rank() == 0


def log(msg: str) -> None:
    if _rank0():
        print(msg, flush=True)


def check_data_inputs(recipe: Recipe, model: ModelConfig | None = None) -> None:
    """Every data problem that can be found without building anything (missing tokenizer or
    dataset files, a vocabulary the model cannot hold): raised before any process group or model."""
    from megatron_grow.data.datasets import check_prefixes, check_tokenizer, parse_data_path
    from megatron_grow.data.tokenizer import load_tokenizer

    d = recipe.data
    if not d.tokenizer_model:
        raise TrainingError("data.tokenizer_model is not set: training needs a sentencepiece model")
    if not d.data_path:
        raise TrainingError("data.data_path is empty: give one or more indexed-dataset prefixes")
    check_prefixes(parse_data_path(list(d.data_path))[0])
    check_tokenizer(load_tokenizer(d.tokenizer_model), model or recipe.model)


class Trainer:
    """Build everything from a recipe, then ``run()``."""

    def __init__(self, recipe: Recipe, *, model: ModelConfig | None = None,
                 initialize: Callable[[list], dict] | None = None, progress: bool = True):
        from megatron_grow.parallel.init import initialize_distributed

        check_data_inputs(recipe, model)
        from megatron.core.transformer.moe import moe_utils

        # MCore's aux-loss tracker is process-global and sized by the first model's layer count.
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
        self.recipe = recipe
        self.model_cfg = model or recipe.model
        self.initialize = initialize
        self.progress = progress
        self.ctx = initialize_distributed(recipe.parallel, seed=recipe.training.seed)
        self.params_dtype = torch.bfloat16 if (recipe.training.bf16 and torch.cuda.is_available()) else torch.float32
        from megatron_grow.config.layout_rules import world_layout_problems

        problems = world_layout_problems(recipe.parallel, self.ctx.world_size, recipe.training)
        if problems:
            raise TrainingError("; ".join(problems))
        self.dp = self.ctx.layout.dp
        t = recipe.training
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dp)

    # -------------------------------------------------------------------------------------------
    def _build(self):
        from megatron.core.distributed import finalize_model_grads

        from megatron_grow.models.builder import build_model_chunks
        from megatron_grow.training.optimizer import build_optimizer, wrap_ddp

        # Weights that are about to be overwritten (growth on load) skip MCore's random init.
        raw = build_model_chunks(self.model_cfg, self.recipe.parallel, params_dtype=self.params_dtype,
                                 initialize=self.initialize is None)
        if self.ctx.device.type == "cuda":
            raw = [m.cuda() for m in raw]
        self.raw_chunks = raw
        self.chunks = wrap_ddp(raw, self.recipe)
        config = raw[0].config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = None
        self.optimizer = build_optimizer(self.chunks, self.recipe, self.params_dtype)

    def _data(self):
        from megatron_grow.data.datasets import build_datasets
        from megatron_grow.data.tokenizer import load_tokenizer

        d = self.recipe.data
        tokenizer = load_tokenizer(d.tokenizer_model)
        recipe = self.recipe
        if self.model_cfg is not recipe.model:
            import dataclasses

            recipe = dataclasses.replace(recipe, model=self.model_cfg)
        self.datasets = build_datasets(d, recipe.model, recipe.training, tokenizer)

    def _batches(self, dataset, consumed: int):
        from megatron.core import parallel_state as ps

        from megatron_grow.data.datasets import make_batch_iterator

        return make_batch_iterator(dataset, consumed, self.recipe.training.micro_batch_size,
                                   ps.get_data_parallel_rank(), self.dp, num_workers=self.recipe.data.num_workers)

    # -------------------------------------------------------------------------------------------
    def _forward_backward(self, micro_batches: list, forward_only: bool) -> float:
        """Mean LM loss over this step's micro batches and data-parallel ranks (last stage value)."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_grow.models.forward import causal_attention_mask

        s = self.model_cfg.seq_length
        device = self.ctx.device
        mask = causal_attention_mask(s, device)

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            tokens = batch["tokens"].to(device)
            labels = batch["labels"].to(device)
            loss_mask = batch["loss_mask"].to(device).float()
            position_ids = batch["position_ids"].to(device)
            output = model(tokens, position_ids, mask, labels=labels)

            def loss_func(per_token):
                loss = (per_token.float() * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)
                # clone: MCore divides the returned loss in place by the number of micro batches
                return loss, {"lm loss": loss.detach().clone()}

            return output, loss_func

        iterators = [iter(micro_batches) for _ in self.chunks]
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(self.chunks) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=s,
            micro_batch_size=self.recipe.training.micro_batch_size,
            forward_only=forward_only,
        )
        # Average on the last stage over micro batches and DP, then share with every rank.
        value = torch.zeros(2, dtype=torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and reduced:
            value[0] = sum(float(r["lm loss"]) for r in reduced)
            value[1] = len(reduced)
        torch.distributed.all_reduce(value)
        return float(value[0] / value[1]) if value[1] > 0 else float("nan")

    def _evaluate(self) -> float | None:
        valid = self.datasets.valid
        t = self.recipe.training
        if valid is None or t.eval_iters == 0:
            return None
        batches = self._batches(valid, 0)
        for c in self.chunks:
            c.eval()
        losses = []
        with torch.no_grad():
            for _ in range(t.eval_iters):
                try:
                    micro = [next(batches) for _ in range(self.num_micro)]
                except StopIteration:
                    break
                losses.append(self._forward_backward(micro, forward_only=True))
        for c in self.chunks:
            c.train()
        return sum(losses) / len(losses) if losses else None

    # -------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        from megatron_grow.checkpoint.manifest import empty_counters
        from megatron_grow.models.routing import RoutingCounter
        from megatron_grow.training.checkpointing import (
            has_checkpoint,
            load_training_checkpoint,
            save_training_checkpoint,
        )
        from megatron_grow.training.flops import training_flops_per_step
        from megatron_grow.training.metrics import MetricSinks
        from megatron_grow.training.optimizer import build_scheduler
        from megatron_grow.training.resume import apply_recipe_schedule

        recipe, t, ck = self.recipe, self.recipe.training, self.recipe.checkpoint
        self._build()
        counters, lineage = empty_counters(), []
        schedule_start = 0
        if has_checkpoint(ck.load):
            scheduler = build_scheduler(self.optimizer, recipe, t.train_iters)
            counters, lineage, ckpt_dir, scheduler_loaded = load_training_checkpoint(
                ck.load, self.chunks, self.optimizer, scheduler, load_optim=ck.load_optim)
            if not scheduler_loaded:  # e.g. the output of `megatron-grow grow`: a fresh schedule from here
                scheduler = build_scheduler(self.optimizer, recipe, t.train_iters - counters["iteration"])
            else:  # a recipe whose schedule differs from the checkpoint's: applied and logged
                scheduler = apply_recipe_schedule(self.optimizer, scheduler, recipe, ckpt_dir, counters["iteration"],
                                                  log)
            log(f"[train] resumed from {ckpt_dir} at iteration {counters['iteration']} "
                f"({counters['consumed_samples']} samples)")
        else:
            if self.initialize is not None:
                grown = self.initialize(self.raw_chunks) or {}
                counters.update(grown.get("counters", {}))
                lineage = list(grown.get("lineage", []))
                schedule_start = counters["iteration"]
                for chunk in self.chunks:  # the grown weights must reach the optimizer's fp32 copies
                    chunk.broadcast_params()
                self.optimizer.reload_model_params()
            scheduler = build_scheduler(self.optimizer, recipe, t.train_iters - schedule_start)
        self._data()
        start_iter = counters["iteration"]
        if start_iter >= t.train_iters:
            log(f"[train] nothing to do: checkpoint is at iteration {start_iter} >= training.train_iters "
                f"({t.train_iters})")
            return RunResult(0, start_iter, counters=counters)
        flops_per_step = training_flops_per_step(self.model_cfg, t.global_batch_size, self.model_cfg.seq_length)
        tokens_per_step = t.global_batch_size * self.model_cfg.seq_length
        sinks = MetricSinks(recipe.logging) if _rank0() else None
        routing = RoutingCounter(self.chunks)
        layout_info = dict(tp=self.ctx.layout.tp, pp=self.ctx.layout.pp, ep=self.ctx.layout.ep,
                           etp=self.ctx.layout.etp, dp=self.dp, world_size=self.ctx.world_size)
        result = RunResult(counters=counters)
        signals = _SignalFlag()
        train_batches = self._batches(self.datasets.train, counters["consumed_samples"])
        last_saved = None
        log(f"[train] iterations {start_iter} -> {t.train_iters}; {self.num_micro} micro batches x "
            f"{t.micro_batch_size} x DP {self.dp} = {t.global_batch_size} sequences of {self.model_cfg.seq_length}; "
            f"{flops_per_step:.3e} FLOPs/step")

        def save():
            return save_training_checkpoint(ck.save, self.chunks, self.optimizer, scheduler, recipe, self.model_cfg,
                                            counters, lineage, layout_info, keep_last=ck.keep_last)

        interval_start, interval_steps = time.perf_counter(), 0
        try:
            for iteration in range(start_iter + 1, t.train_iters + 1):
                try:
                    micro = [next(train_batches) for _ in range(self.num_micro)]
                except StopIteration:
                    raise TrainingError(f"training data ran out at iteration {iteration}") from None
                for c in self.chunks:
                    c.zero_grad_buffer()
                self.optimizer.zero_grad()
                where = f"the last good checkpoint is {last_saved or ck.load or '(none saved yet)'}"
                try:
                    loss = self._forward_backward(micro, forward_only=False)
                except RuntimeError as e:  # DDP's check_for_nan_in_grad, raised before any update
                    if "NaN" not in str(e) and "Inf" not in str(e):
                        raise
                    raise TrainingError(f"non-finite gradients at iteration {iteration}; stopping without "
                                        f"saving: {where}") from None
                if not math.isfinite(loss):
                    raise TrainingError(f"loss is {loss} at iteration {iteration}; stopping without saving: {where}")
                ok, grad_norm, _ = self.optimizer.step()
                if grad_norm is not None and not math.isfinite(float(grad_norm)):
                    raise TrainingError(f"gradient norm is {grad_norm} at iteration {iteration}; stopping without "
                                        f"saving (this step's update is discarded with the process): {where}")
                scheduler.step(increment=1)
                counters["iteration"] = iteration
                counters["consumed_samples"] += t.global_batch_size
                counters["consumed_tokens"] += tokens_per_step
                counters["flops_so_far"] += flops_per_step
                result.train_losses.append((iteration, loss))
                interval_steps += 1
                if iteration % recipe.logging.log_interval == 0 or iteration == t.train_iters:
                    elapsed = time.perf_counter() - interval_start
                    loads = routing.snapshot(self.model_cfg.num_layers, self.model_cfg.num_moe_experts)
                    share = loads / loads.sum(1, keepdim=True).clamp_min(1) * self.model_cfg.num_moe_experts
                    metrics = {
                        "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "tokens_per_s": tokens_per_step * interval_steps / elapsed,
                        "expert_load_max": float(share.max()), "expert_load_min": float(share.min()),
                        "flops_so_far": counters["flops_so_far"], "sunk_flops": counters["sunk_flops"],
                        "new_flops": counters["flops_so_far"] - counters["sunk_flops"],
                        "aux_loss": _aux_loss() / (self.model_cfg.num_layers * self.num_micro * interval_steps),
                    }
                    if self.ctx.device.type == "cuda":
                        achieved = flops_per_step * interval_steps / elapsed / self.ctx.world_size
                        metrics["tflops_per_gpu"] = achieved / 1e12
                        metrics["mfu"] = achieved / H100_BF16_PEAK_FLOPS
                    if sinks:
                        sinks.write(iteration, metrics)
                    interval_start, interval_steps = time.perf_counter(), 0
                if t.eval_interval and (iteration % t.eval_interval == 0 or iteration == t.train_iters):
                    valid = self._evaluate()
                    if valid is not None:
                        result.valid_losses.append((iteration, valid, counters["flops_so_far"]))
                        if sinks:
                            sinks.write(iteration, {"valid_loss": valid}, prefix="valid")
                stop = signals.any_rank()
                if ck.save and (iteration % ck.save_interval == 0 or iteration == t.train_iters or stop):
                    last_saved = save()
                    log(f"[train] saved {last_saved}")
                if stop:
                    log(f"[train] signal {signals.signum or 'on another rank'}: saved at iteration {iteration}, "
                        f"exiting with code {EXIT_PREEMPTED}")
                    result.exit_code = EXIT_PREEMPTED
                    break
        finally:
            signals.restore()
            routing.close()
            if sinks:
                sinks.close()
        result.iteration = counters["iteration"]
        result.last_checkpoint = last_saved
        if result.valid_losses:
            first, last = result.valid_losses[0][1], result.valid_losses[-1][1]
            log(f"[train] done at iteration {result.iteration}: validation loss {first:.4f} -> {last:.4f}; "
                f"{counters['flops_so_far']:.3e} FLOPs so far ({counters['sunk_flops']:.3e} sunk)")
        return result


def _aux_loss() -> float:
    """MoE aux losses (unscaled by their coefficient) MCore tracked since the last call, summed over
    layers and micro batches, then cleared; the caller turns it into a per-layer, per-batch mean."""
    from megatron.core.transformer.moe import moe_utils

    try:
        moe_utils.reduce_aux_losses_tracker_across_ranks()
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        total = sum(float(v["values"].sum()) for v in tracker.values())
        moe_utils.clear_aux_losses_tracker()
        return total
    except Exception:
        return float("nan")
