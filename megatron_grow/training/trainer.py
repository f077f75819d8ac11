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

``Trainer.run()`` is the whole run. Its steps are public for callers that need one of them
(the experiments evaluate a run's starting weights with them):

    trainer = Trainer(recipe)
    trainer.build()                 # model chunks, DDP, optimizer
    trainer.restore()               # resume / initialize callback / random init; LR schedule; counters
    trainer.build_data()            # MCore datasets for the model being trained
    trainer.evaluate()              # validation loss on the fixed validation samples
    trainer.train_step(trainer.next_step_batches(batches))   # one optimizer step
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe import moe_utils

from megatron_grow.checkpoint.grown_start import GrownStart
from megatron_grow.checkpoint.manifest import empty_counters
from megatron_grow.config.layout_rules import world_layout_problems
from megatron_grow.config.schema import ModelConfig, Recipe, moe_layer_pattern
from megatron_grow.data.datasets import (
    SplitDatasets,
    build_datasets,
    check_prefixes,
    check_tokenizer,
    make_batch_iterator,
    parse_data_path,
)
from megatron_grow.data.tokenizer import load_tokenizer
from megatron_grow.errors import EXIT_PREEMPTED, TrainingError
from megatron_grow.log import component_log
from megatron_grow.models.builder import build_model_chunks
from megatron_grow.models.forward import causal_attention_mask
from megatron_grow.models.routing import RoutingCounter
from megatron_grow.parallel.collectives import all_reduce_host, is_rank0, print_rank0
from megatron_grow.parallel.init import initialize_distributed
from megatron_grow.parallel.preemption import pending_signal
from megatron_grow.training.checkpointing import has_checkpoint, load_training_checkpoint, save_training_checkpoint
from megatron_grow.training.flops import training_flops_per_step
from megatron_grow.training.metrics import MetricSinks
from megatron_grow.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
from megatron_grow.training.peak_flops import current_device_peak
from megatron_grow.training.resume import apply_recipe_schedule


@dataclass
class RunResult:
    exit_code: int = 0
    iteration: int = 0
    train_losses: list = field(default_factory=list)   # (iteration, loss)
    valid_losses: list = field(default_factory=list)   # (iteration, loss, flops_so_far)
    counters: dict = field(default_factory=dict)
    last_checkpoint: str | None = None
    intervals: list = field(default_factory=list)      # the metrics dict of every log interval
    peak: str = ""                                     # which peak MFU was measured against


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports."""

    iteration: int
    loss: float                 # mean LM loss over the step's micro batches and data-parallel ranks
    grad_norm: float | None     # None when the optimizer does not compute it


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
        all_reduce_host(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


log = component_log("train")


def check_data_inputs(recipe: Recipe, model: ModelConfig | None = None) -> None:
    """Every data problem that can be found without building anything (missing tokenizer or
    dataset files, a vocabulary the model cannot hold): raised before any process group or model."""
    d = recipe.data
    if not d.tokenizer_model:
        raise TrainingError("data.tokenizer_model is not set: training needs a sentencepiece model")
    if not d.data_path:
        raise TrainingError("data.data_path is empty: give one or more indexed-dataset prefixes")
    check_prefixes(parse_data_path(list(d.data_path))[0])
    check_tokenizer(load_tokenizer(d.tokenizer_model), model or recipe.model)


class _IntervalMetrics:
    """The metrics written every ``logging.log_interval`` steps (console, tensorboard, wandb on
    rank 0). Routing counts and aux losses are collectives, so every rank takes part."""

    def __init__(self, trainer: Trainer, result: RunResult):
        self.trainer, self.result = trainer, result
        self.sinks = MetricSinks(trainer.recipe.logging) if is_rank0() else None
        self.routing = RoutingCounter(trainer.chunks)
        self.started, self.steps = time.perf_counter(), 0
        self.peak = current_device_peak(trainer.recipe.logging.peak_tflops)
        result.peak = self.peak.describe()
        self.run_seconds, self.run_steps = 0.0, 0

    def after_step(self, step: StepResult) -> None:
        self.steps += 1
        every, last = self.trainer.recipe.logging.log_interval, self.trainer.recipe.training.train_iters
        if step.iteration % every == 0 or step.iteration == last:
            self._write(step)
            self.started, self.steps = time.perf_counter(), 0

    def _write(self, step: StepResult) -> None:
        tr, m, c = self.trainer, self.trainer.model_cfg, self.trainer.counters
        elapsed = time.perf_counter() - self.started
        moe_layers = [i for i, moe in enumerate(moe_layer_pattern(m)) if moe]  # dense layers route nothing
        loads = self.routing.snapshot(m.num_layers, m.num_moe_experts)[moe_layers]
        share = loads / loads.sum(1, keepdim=True).clamp_min(1) * m.num_moe_experts
        metrics = {
            "loss": step.loss, "lr": tr.optimizer.param_groups[0]["lr"],
            "grad_norm": float(step.grad_norm) if step.grad_norm is not None else float("nan"),
            "tokens_per_s": tr.tokens_per_step * self.steps / elapsed,
            "expert_load_max": float(share.max()), "expert_load_min": float(share.min()),
            "flops_so_far": c["flops_so_far"], "sunk_flops": c["sunk_flops"],
            "new_flops": c["flops_so_far"] - c["sunk_flops"],
            "aux_loss": _aux_loss() / (len(moe_layers) * tr.num_micro * self.steps),
        }
        if tr.ctx.device.type == "cuda" or self.peak.flops is not None:
            achieved = tr.flops_per_step * self.steps / elapsed / tr.ctx.world_size
            metrics["tflops_per_gpu"] = achieved / 1e12
            if self.peak.flops is not None:
                metrics["mfu"] = achieved / self.peak.flops
        self.run_seconds, self.run_steps = self.run_seconds + elapsed, self.run_steps + self.steps
        self.result.intervals.append(dict(metrics, iteration=step.iteration, steps=self.steps, seconds=elapsed))
        if self.sinks:
            self.sinks.write(step.iteration, metrics)

    def validation(self, iteration: int, loss: float) -> None:
        if self.sinks:
            self.sinks.write(iteration, {"valid_loss": loss}, prefix="valid")

    def summary(self) -> str | None:
        """Throughput over the whole run against the device peak (None without a known peak)."""
        if not self.run_steps or self.peak.flops is None:
            return None
        tr = self.trainer
        rate = self.run_steps / self.run_seconds / tr.ctx.world_size
        full, causal = tr.flops_per_step * rate, tr.flops_per_step_causal * rate
        # Both: full s x s attention is Megatron-LM's count (and the FLOPs counter's); a causal
        # kernel does about half the score work, so the full count flatters it.
        return (f"throughput over {self.run_steps} steps: "
                f"{tr.tokens_per_step * self.run_steps / self.run_seconds:,.0f} tok/s, "
                f"{causal / 1e12:.1f} TFLOP/s/GPU attention counted causal (MFU {causal / self.peak.flops:.1%}), "
                f"{full / 1e12:.1f} counted full (MFU {full / self.peak.flops:.1%}), of {self.peak.describe()}")

    def close(self) -> None:
        self.routing.close()
        if self.sinks:
            self.sinks.close()


class Trainer:
    """Build everything from a recipe, then ``run()`` (or drive the public steps one by one)."""

    def __init__(self, recipe: Recipe, *, model: ModelConfig | None = None,
                 initialize: Callable[[list], GrownStart | None] | None = None, progress: bool = True,
                 use_te: bool | None = None):
        check_data_inputs(recipe, model)
        # MCore's aux-loss tracker is process-global and sized by the first model's layer count.
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
        self.recipe = recipe
        self.model_cfg = model or recipe.model
        self.initialize = initialize
        self.progress = progress
        self.use_te = use_te  # None: TE spec when TE imports on a GPU; False: the local spec
        self.ctx = initialize_distributed(recipe.parallel, seed=recipe.training.seed)
        self.params_dtype = torch.bfloat16 if (recipe.training.bf16 and torch.cuda.is_available()) else torch.float32
        problems = world_layout_problems(recipe.parallel, self.ctx.world_size, recipe.training)
        if problems:
            raise TrainingError("; ".join(problems))
        self.dp = self.ctx.layout.dp
        self.attention_mask = causal_attention_mask(self.model_cfg.seq_length, self.ctx.device)
        t = recipe.training
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dp)
        self.tokens_per_step = t.global_batch_size * self.model_cfg.seq_length
        self.flops_per_step = training_flops_per_step(self.model_cfg, t.global_batch_size, self.model_cfg.seq_length)
        self.flops_per_step_causal = training_flops_per_step(self.model_cfg, t.global_batch_size,
                                                             self.model_cfg.seq_length, causal=True)
        self.counters, self.lineage = empty_counters(), []
        self.scheduler = None
        self.datasets: SplitDatasets | None = None
        self.last_saved: str | None = None

    # ------------------------------------------------------------------------------- building
    def build(self) -> None:
        """The model chunks (``raw_chunks``; DDP-wrapped as ``chunks``) and MCore's optimizer."""
        # Weights that are about to be overwritten (growth on load) skip MCore's random init.
        raw = build_model_chunks(self.model_cfg, self.recipe.parallel, params_dtype=self.params_dtype,
                                 initialize=self.initialize is None, use_te=self.use_te)
        if self.ctx.device.type == "cuda":
            raw = [m.cuda() for m in raw]
        self.raw_chunks = raw
        self.chunks = wrap_ddp(raw, self.recipe)
        config = raw[0].config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = None
        self.optimizer = build_optimizer(self.chunks, self.recipe, self.params_dtype)

    def restore(self) -> dict:
        """Where the weights come from: the checkpoint under ``checkpoint.load`` (resume), else the
        ``initialize`` callback, else MCore's random init. Sets the LR schedule; returns the counters."""
        if has_checkpoint(self.recipe.checkpoint.load):
            self._resume()
        else:
            self._initialize_weights()
        return self.counters

    def _resume(self) -> None:
        recipe, ck = self.recipe, self.recipe.checkpoint
        train_iters = recipe.training.train_iters
        scheduler = build_scheduler(self.optimizer, recipe, train_iters)
        counters, lineage, ckpt_dir, scheduler_loaded = load_training_checkpoint(
            ck.load, self.chunks, self.optimizer, scheduler, load_optim=ck.load_optim,
            expert_backend=self.model_cfg.moe_expert_backend)
        if not scheduler_loaded:  # e.g. the output of `megatron-grow grow`: a fresh schedule from here
            scheduler = build_scheduler(self.optimizer, recipe, train_iters - counters["iteration"],
                                        restarted=counters["iteration"] > 0)
        else:  # a recipe whose schedule differs from the checkpoint's: applied and logged
            scheduler = apply_recipe_schedule(self.optimizer, scheduler, recipe, ckpt_dir, counters["iteration"],
                                              print_rank0)
        self.counters, self.lineage, self.scheduler = counters, lineage, scheduler
        log(f"resumed from {ckpt_dir} at iteration {counters['iteration']} "
            f"({counters['consumed_samples']} samples)")

    def _initialize_weights(self) -> None:
        counters, lineage, schedule_start = empty_counters(), [], 0
        if self.initialize is not None:
            grown = self.initialize(self.raw_chunks) or GrownStart()
            counters.update(grown.counters)
            lineage = list(grown.lineage)
            schedule_start = counters["iteration"]
            for chunk in self.chunks:  # the grown weights must reach the optimizer's fp32 copies
                chunk.broadcast_params()
            self.optimizer.reload_model_params()
            if grown.load_optimizer is not None:  # growth.optimizer: carry
                grown.load_optimizer(self.optimizer, self.chunks)
        self.counters, self.lineage = counters, lineage
        self.scheduler = build_scheduler(self.optimizer, self.recipe, self.recipe.training.train_iters - schedule_start,
                                         restarted=schedule_start > 0)

    def load_weights(self, root: str) -> None:
        """Only the model weights of the checkpoint under ``root`` (no optimizer, schedule or counters)."""
        load_training_checkpoint(root, self.chunks, None, None, load_optim=False)

    def build_data(self) -> SplitDatasets:
        """MCore's train/valid/test datasets for the model being trained (``datasets``)."""
        tokenizer = load_tokenizer(self.recipe.data.tokenizer_model)
        self.datasets = build_datasets(self.recipe.data, self.model_cfg, self.recipe.training, tokenizer)
        return self.datasets

    # ----------------------------------------------------------------------------------- data
    def train_batches(self, consumed_samples: int) -> Iterator[dict]:
        """This rank's training micro batches, starting at global sample ``consumed_samples``."""
        return self._batches(self.datasets.train, consumed_samples)

    def validation_batches(self) -> Iterator[dict]:
        """This rank's validation micro batches, always from validation sample 0."""
        return self._batches(self.datasets.valid, 0)

    def validation_token_ids(self) -> torch.Tensor:
        """``[samples, seq_length + 1]``: the token ids of every validation sample :meth:`evaluate`
        reads, all data-parallel ranks together (samples ``0 .. eval_iters * global_batch_size - 1``)."""
        t, valid = self.recipe.training, self.datasets.valid
        n = 0 if valid is None else min(len(valid), t.eval_iters * t.global_batch_size)
        rows = [torch.cat([torch.as_tensor(s["tokens"]), torch.as_tensor(s["labels"])[-1:]])
                for s in (valid[i] for i in range(n))]
        return torch.stack(rows) if rows else torch.empty(0, self.model_cfg.seq_length + 1, dtype=torch.int64)

    def next_step_batches(self, batches: Iterator[dict]) -> list[dict]:
        """The micro batches of one step from ``batches``; TrainingError when the data runs out."""
        try:
            return [next(batches) for _ in range(self.num_micro)]
        except StopIteration:
            raise TrainingError(f"training data ran out at iteration {self.counters['iteration'] + 1}") from None

    def _batches(self, dataset, consumed: int) -> Iterator[dict]:
        return make_batch_iterator(dataset, consumed, self.recipe.training.micro_batch_size,
                                   ps.get_data_parallel_rank(), self.dp, num_workers=self.recipe.data.num_workers)

    # ---------------------------------------------------------------------------------- steps
    def _forward_step(self, data_iterator, model):
        device = self.ctx.device
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device)
        labels = batch["labels"].to(device)
        loss_mask = batch["loss_mask"].to(device).float()
        position_ids = batch["position_ids"].to(device)
        output = model(tokens, position_ids, self.attention_mask, labels=labels)

        def loss_func(per_token):
            loss = (per_token.float() * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)
            # clone: MCore divides the returned loss in place by the number of micro batches
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    def _forward_backward(self, micro_batches: list, forward_only: bool) -> float:
        """Mean LM loss over this step's micro batches and data-parallel ranks (last stage value)."""
        iterators = [iter(micro_batches) for _ in self.chunks]
        reduced = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(self.chunks) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=self.model_cfg.seq_length,
            micro_batch_size=self.recipe.training.micro_batch_size,
            forward_only=forward_only,
        )
        # Average on the last stage over micro batches and DP, then share with every rank.
        value = torch.zeros(2, dtype=torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and reduced:
            value[0] = sum(float(r["lm loss"]) for r in reduced)
            value[1] = len(reduced)
        all_reduce_host(value)
        return float(value[0] / value[1]) if value[1] > 0 else float("nan")

    def evaluate(self) -> float | None:
        """Mean validation loss over ``training.eval_iters`` steps of the validation batches (the same
        samples, from index 0, at every call); None without a validation split or with eval_iters 0."""
        t = self.recipe.training
        if self.datasets.valid is None or t.eval_iters == 0:
            return None
        batches = self.validation_batches()
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

    def train_step(self, micro_batches: list) -> StepResult:
        """One optimizer step: forward-backward over ``micro_batches``, the optimizer, the LR schedule and
        the counters. A non-finite loss, gradient or gradient norm raises TrainingError (nothing saved)."""
        iteration = self.counters["iteration"] + 1
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        where = self._checkpoint_left_in_place()
        try:
            loss = self._forward_backward(micro_batches, forward_only=False)
        except RuntimeError as e:  # DDP's check_for_nan_in_grad, raised before any update
            if "NaN" not in str(e) and "Inf" not in str(e):
                raise
            raise TrainingError(f"non-finite gradients at iteration {iteration}; stopping without "
                                f"saving: {where}") from None
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at iteration {iteration}; stopping without saving: {where}")
        _, grad_norm, _ = self.optimizer.step()
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise TrainingError(f"gradient norm is {grad_norm} at iteration {iteration}; stopping without "
                                f"saving (this step's update is discarded with the process): {where}")
        self.scheduler.step(increment=1)
        self._count_step(iteration)
        return StepResult(iteration, loss, grad_norm)

    def _checkpoint_left_in_place(self) -> str:
        """What a stop for non-finite numbers leaves: this run's last save (its weights were finite when
        saved: the save follows a finite step), else the checkpoint it started from, which load
        checked for finite weights; never a claim about one that was not checked."""
        if self.last_saved:
            return f"the last good checkpoint is {self.last_saved}"
        if has_checkpoint(self.recipe.checkpoint.load):
            return (f"this run saved nothing; it started from {self.recipe.checkpoint.load}, whose weights are finite "
                    "(the numbers diverged in training: lower training.lr or set training.clip_grad)")
        return "this run saved no checkpoint yet"

    def _count_step(self, iteration: int) -> None:
        c = self.counters
        c["iteration"] = iteration
        c["consumed_samples"] += self.recipe.training.global_batch_size
        c["consumed_tokens"] += self.tokens_per_step
        c["flops_so_far"] += self.flops_per_step

    def save(self) -> str:
        """A training checkpoint under ``checkpoint.save`` (model, optimizer, schedule, counters, lineage)."""
        ck = self.recipe.checkpoint
        self.last_saved = save_training_checkpoint(ck.save, self.chunks, self.optimizer, self.scheduler, self.recipe,
                                                   self.model_cfg, self.counters, self.lineage,
                                                   self.ctx.layout.as_record(),
                                                   keep_last=ck.keep_last)
        log(f"saved {self.last_saved}")
        return self.last_saved

    # ------------------------------------------------------------------------------------ run
    def run(self) -> RunResult:
        """Build, restore, train to ``training.train_iters`` with evaluations and saves; the result."""
        t = self.recipe.training
        self.build()
        self.restore()
        self.build_data()
        start = self.counters["iteration"]
        if start >= t.train_iters:
            log(f"nothing to do: checkpoint is at iteration {start} >= training.train_iters "
                f"({t.train_iters})")
            return RunResult(0, start, counters=self.counters)
        log(f"iterations {start} -> {t.train_iters}; {self.num_micro} micro batches x "
            f"{t.micro_batch_size} x DP {self.dp} = {t.global_batch_size} sequences of {self.model_cfg.seq_length}; "
            f"{self.flops_per_step:.3e} FLOPs/step")
        result = RunResult(counters=self.counters)
        metrics, signals = _IntervalMetrics(self, result), _SignalFlag()
        log(f"MFU against {metrics.peak.describe()}")
        try:
            self._train_loop(result, metrics, signals)
        finally:
            signals.restore()
            metrics.close()
        throughput = metrics.summary()
        if throughput:
            log(throughput)
        return self._finish(result)

    def _train_loop(self, result: RunResult, metrics: _IntervalMetrics, signals: _SignalFlag) -> None:
        t, ck = self.recipe.training, self.recipe.checkpoint
        batches = self.train_batches(self.counters["consumed_samples"])
        for iteration in range(self.counters["iteration"] + 1, t.train_iters + 1):
            step = self.train_step(self.next_step_batches(batches))
            result.train_losses.append((iteration, step.loss))
            metrics.after_step(step)
            if t.eval_interval and (iteration % t.eval_interval == 0 or iteration == t.train_iters):
                valid = self.evaluate()
                if valid is not None:
                    result.valid_losses.append((iteration, valid, self.counters["flops_so_far"]))
                    metrics.validation(iteration, valid)
            stop = signals.any_rank()
            if ck.save and (iteration % ck.save_interval == 0 or iteration == t.train_iters or stop):
                self.save()
            if stop:
                log(f"signal {signals.signum or 'on another rank'}: saved at iteration {iteration}, "
                    f"exiting with code {EXIT_PREEMPTED}")
                result.exit_code = EXIT_PREEMPTED
                return

    def _finish(self, result: RunResult) -> RunResult:
        counters = self.counters
        result.iteration = counters["iteration"]
        result.last_checkpoint = self.last_saved
        if result.valid_losses:
            first, last = result.valid_losses[0][1], result.valid_losses[-1][1]
            log(f"done at iteration {result.iteration}: validation loss {first:.4f} -> {last:.4f}; "
                f"{counters['flops_so_far']:.3e} FLOPs so far ({counters['sunk_flops']:.3e} sunk)")
        return result


def _aux_loss() -> float:
    """MoE aux losses (unscaled by their coefficient) MCore tracked since the last call, summed over
    layers and micro batches, then cleared; the caller turns it into a per-layer, per-batch mean."""
    try:
        moe_utils.reduce_aux_losses_tracker_across_ranks()
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        total = sum(float(v["values"].sum()) for v in tracker.values())
        moe_utils.clear_aux_losses_tracker()
        return total
    except Exception as e:  # logged, not raised: a metric must not stop training
        warnings.warn(f"MoE aux-loss logging failed ({type(e).__name__}: {e}); aux_loss is logged as NaN",
                      RuntimeWarning, stacklevel=2)
        return float("nan")
