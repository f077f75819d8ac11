"""Parallel-layout arithmetic: no process groups, no torch.

Megatron-Core's rank order: the world is tp x cp x dp x pp for dense parts and
etp x ep x edp x pp for experts, with data parallelism what the world size leaves.
These functions say whether a layout fits a model and a world size, and why not.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_grow.config.schema import ModelConfig, ParallelConfig, TrainingConfig


@dataclass(frozen=True)
class Layout:
    """A concrete layout for a given world size."""

    world_size: int
    tp: int
    pp: int
    ep: int
    etp: int
    cp: int
    vpp: int | None

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        return self.world_size // (self.etp * self.ep * self.pp)

    def as_record(self) -> dict:
        """The layout as checkpoint manifests record it (``megatron_grow.json``'s ``layout``)."""
        return dict(tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp, dp=self.dp, world_size=self.world_size)


def expert_tensor_parallel_size(parallel: ParallelConfig) -> int:
    """ETP as Megatron-Core resolves it: null means the same as TP."""
    return parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size


def resolve_layout(parallel: ParallelConfig, world_size: int) -> Layout:
    etp = expert_tensor_parallel_size(parallel)
    return Layout(world_size, parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.expert_model_parallel_size, etp, parallel.context_parallel_size,
                  parallel.virtual_pipeline_model_parallel_size)


def sequence_parallel_enabled(parallel: ParallelConfig) -> bool:
    if parallel.sequence_parallel is None:
        return parallel.tensor_model_parallel_size > 1
    return parallel.sequence_parallel


def _mla_layout_problems(model: ModelConfig, tp: int) -> list[str]:
    """MCore's local MLA shards the outputs of its latent down-projections over TP (column-parallel)."""
    out = []
    widths = (("model.q_lora_rank", model.q_lora_rank),
              ("model.kv_lora_rank + model.qk_pos_emb_head_dim", model.kv_lora_rank + model.qk_pos_emb_head_dim))
    for name, width in widths:
        if width and width % tp:
            out.append(f"parallel.tensor_model_parallel_size ({tp}) must divide {name} ({width}) with "
                       "multi-latent attention")
    return out


def model_layout_problems(model: ModelConfig, parallel: ParallelConfig) -> list[str]:
    """Problems that do not depend on the world size."""
    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    ep = parallel.expert_model_parallel_size
    etp = expert_tensor_parallel_size(parallel)
    vpp = parallel.virtual_pipeline_model_parallel_size
    out = []
    if model.num_attention_heads % tp:
        out.append(f"parallel.tensor_model_parallel_size ({tp}) must divide model.num_attention_heads "
                   f"({model.num_attention_heads})")
    if model.num_query_groups % tp and not model.multi_latent_attention:
        out.append(f"parallel.tensor_model_parallel_size ({tp}) must divide model.num_query_groups "
                   f"({model.num_query_groups})")
    if model.multi_latent_attention:
        out.extend(_mla_layout_problems(model, tp))
    if model.num_moe_experts % ep:
        out.append(f"parallel.expert_model_parallel_size ({ep}) must divide model.num_moe_experts "
                   f"({model.num_moe_experts})")
    if model.moe_ffn_hidden_size % etp:
        out.append(f"parallel.expert_tensor_parallel_size ({etp}) must divide model.moe_ffn_hidden_size "
                   f"({model.moe_ffn_hidden_size})")
    if model.moe_shared_expert_intermediate_size and model.moe_shared_expert_intermediate_size % tp:
        out.append(f"parallel.tensor_model_parallel_size ({tp}) must divide "
                   f"model.moe_shared_expert_intermediate_size ({model.moe_shared_expert_intermediate_size})")
    stages = pp * (vpp or 1)
    if model.num_layers % stages:
        what = f"pipeline_model_parallel_size x virtual_pipeline_model_parallel_size ({pp} x {vpp})" if vpp \
            else f"pipeline_model_parallel_size ({pp})"
        out.append(f"parallel.{what} must divide model.num_layers ({model.num_layers})")
    if vpp and pp < 2:
        out.append("parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2")
    if tp > 1 and parallel.sequence_parallel is False:
        out.append(f"parallel.sequence_parallel must be true (or null) with tensor_model_parallel_size {tp}: "
                   "Megatron-Core requires sequence parallelism for MoE with TP > 1")
    if parallel.context_parallel_size > 1:  # MCore's CP needs its attention path and split batches; we do neither
        out.append(f"parallel.context_parallel_size ({parallel.context_parallel_size}) > 1 is not supported yet: "
                   "nothing splits sequences across context-parallel ranks; use 1")
    if model.seq_length % (tp * parallel.context_parallel_size) and tp > 1:
        out.append(f"model.seq_length ({model.seq_length}) must be divisible by tensor_model_parallel_size x "
                   f"context_parallel_size ({tp * parallel.context_parallel_size}) for sequence parallelism")
    return out


def world_layout_problems(parallel: ParallelConfig, world_size: int,
                          training: TrainingConfig | None = None) -> list[str]:
    """Problems that appear once the world size is known."""
    layout = resolve_layout(parallel, world_size)
    out = []
    dense = layout.tp * layout.pp * layout.cp
    if world_size % dense:
        out.append(f"world size {world_size} is not divisible by tensor x pipeline x context parallel "
                   f"({layout.tp} x {layout.pp} x {layout.cp} = {dense})")
        return out
    expert = layout.etp * layout.ep * layout.pp
    if world_size % expert:
        out.append(f"world size {world_size} is not divisible by expert_tensor x expert x pipeline parallel "
                   f"({layout.etp} x {layout.ep} x {layout.pp} = {expert})")
    if training is not None:
        step = training.micro_batch_size * layout.dp
        if training.global_batch_size % step:
            out.append(f"training.global_batch_size ({training.global_batch_size}) must be divisible by "
                       f"micro_batch_size x data-parallel size ({training.micro_batch_size} x {layout.dp} = {step})")
    return out


def padded_vocab_size(model: ModelConfig, tp: int = 1) -> int:
    """Megatron-LM's padding: round up to a multiple of make_vocab_size_divisible_by x TP."""
    multiple = model.make_vocab_size_divisible_by * tp
    return -(-model.vocab_size // multiple) * multiple
