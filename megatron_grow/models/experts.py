"""Routed experts on torch's own grouped GEMM, stored exactly as Megatron-Core's ``SequentialMLP``.

``SequentialMLP`` runs one small matmul pair per local expert (a Python loop, 2 x E_local
kernel launches per layer and direction); ``GroupedMLP``/``TEGroupedMLP`` need the
``grouped_gemm`` package or Transformer Engine. :class:`GroupedMMExperts` runs all local
experts of a layer in two ``torch.nn.functional.grouped_mm`` calls (CUTLASS grouped GEMM on
sm90/sm100 in bf16; a loop inside torch elsewhere), with nothing beyond torch installed.

Weights: ``weight1`` is ``[E_local, fc1_rows, H]`` (each slice is one expert's
``linear_fc1.weight``, SwiGLU gate rows then up rows) and ``weight2`` is ``[E_local, H, F/etp]``
(``linear_fc2.weight``). ``sharded_state_dict`` asks a ``SequentialMLP`` of the same shape,
built on the meta device, for its sharded state dict and hands out views of the stacked
weights in its place, so keys, global shapes, offsets and replica ids are ``SequentialMLP``'s
by construction: a checkpoint does not depend on which backend wrote it, and growth (which
fills the views in place) works unchanged. One ``ShardedTensorFactory`` per stacked weight
carries the parameter itself, so optimizer state that is mapped by parameter finds it.

Constraints (checked when the recipe loads, see ``expert_backend_problems``): no linear
biases, and ``hidden_size`` and ``moe_ffn_hidden_size / expert TP`` multiples of 8 (the
grouped GEMM needs 16-byte aligned strides).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu, _initialize_affine_weight_gpu
from megatron.core.tensor_parallel.utils import divide
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_grow.config.check import expert_backend_problems
from megatron_grow.errors import ConfigError
from megatron_grow.models.mcore_config import parameter_device


def grouped_mm_kernel():
    """This torch's grouped GEMM: ``F.grouped_mm`` (torch >= 2.10, CUDA and CPU), else
    ``torch._grouped_mm`` (torch >= 2.8, CUDA only), else None. setup.py admits torch 2.6, so the
    kernel is chosen by what exists, not by a version number."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_problem(on_cuda: bool) -> str | None:
    """Why ``grouped_mm`` experts cannot run fast here (None when they can). Without a CUDA kernel
    a GPU run would fall back to the per-expert loop, which is ``sequential``'s speed by another
    name: refused. On CPU the loop is what torch runs anyway."""
    if not on_cuda or grouped_mm_kernel() is not None:
        return None
    return (f"model.moe_expert_backend=grouped_mm needs torch >= 2.8 (torch._grouped_mm; F.grouped_mm from "
            f"2.10), this torch is {torch.__version__}: upgrade torch or use moe_expert_backend=sequential")


def _per_expert_matmuls(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]]).tolist()
    return torch.cat([x[s:e] @ w.t() for s, e, w in zip(starts, offsets.tolist(), weights)])


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` of ``x`` times ``weights[e].T`` for each expert ``e``."""
    if x.shape[0] == 0:  # no tokens reached this rank's experts: an empty product, still in the graph
        return x @ weights[0].t()
    kernel = getattr(F, "grouped_mm", None)
    if x.is_cuda and x.dtype == torch.bfloat16:
        kernel = kernel or getattr(torch, "_grouped_mm", None)  # torch._grouped_mm is CUDA bf16 only
    elif x.is_cuda:
        kernel = None  # torch's fast CUDA kernel is bf16 only; other dtypes get the same matmuls in a loop
    if kernel is None:
        return _per_expert_matmuls(x, weights, offsets)
    return kernel(x, weights.transpose(1, 2), offs=offsets)


class GroupedMMExperts(MegatronModule):
    """A drop-in for ``SequentialMLP`` in MCore's MoE layer spec (same constructor, same I/O)."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, submodules: MLPSubmodules,
                 pg_collection=None):
        if config.moe_ffn_hidden_size != config.ffn_hidden_size:
            config = copy.deepcopy(config)
            config.ffn_hidden_size = config.moe_ffn_hidden_size
        super().__init__(config=config)
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        tp = self.tp_group.size()
        problems = expert_backend_problems("grouped_mm", config.hidden_size, config.moe_ffn_hidden_size, tp,
                                           config.add_bias_linear, config.moe_grouped_gemm)
        kernel_problem = grouped_mm_problem(torch.cuda.is_available())
        problems += [kernel_problem] if kernel_problem else []
        if problems:
            raise ValueError("; ".join(problems))
        ffn = divide(config.moe_ffn_hidden_size, tp)
        fc1_rows = 2 * ffn if config.gated_linear_unit else ffn
        device = parameter_device(config)  # MCore's device; an ambient meta device wins over cuda
        empty = lambda *shape: torch.nn.Parameter(torch.empty(*shape, dtype=config.params_dtype, device=device))
        self.weight1 = empty(num_local_experts, fc1_rows, config.hidden_size)
        self.weight2 = empty(num_local_experts, config.hidden_size, ffn)
        self._initialize(fc1_rows * tp, ffn * tp)
        expert_parallel = config.expert_model_parallel_size > 1
        for weight, dim in ((self.weight1, 1), (self.weight2, 2)):
            # Read by DDP (expert grads reduce over the expert-data-parallel group) and grad-norm code.
            weight.allreduce = not expert_parallel
            weight.tensor_model_parallel = True
            weight.partition_dim = dim
            weight.partition_stride = 1
        # Not a submodule: the meta-device SequentialMLP that defines the checkpoint layout.
        self._layout = [self._layout_template(submodules, pg_collection)]

    def _initialize(self, fc1_out: int, ffn: int) -> None:
        """Per expert, in SequentialMLP's order (fc1 then fc2), with MCore's own init functions."""
        c = self.config
        if not c.perform_initialization:
            return
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        for e in range(self.num_local_experts):
            for weight, rows, cols, dim, method in (
                    (self.weight1.data[e], fc1_out, c.hidden_size, 0, c.init_method),
                    (self.weight2.data[e], c.hidden_size, ffn, 1, c.output_layer_init_method)):
                if c.use_cpu_initialization:
                    _initialize_affine_weight_cpu(weight, rows, cols, weight.shape[dim], dim, method,
                                                  params_dtype=c.params_dtype, rank=tp_rank, world_size=tp_size,
                                                  skip_set_tensor_parallel_attributes=True)
                else:
                    _initialize_affine_weight_gpu(weight, method, dim, is_expert=True)

    def _layout_template(self, submodules: MLPSubmodules, pg_collection) -> SequentialMLP:
        config = copy.deepcopy(self.config)
        config.perform_initialization = False
        config.use_cpu_initialization = True  # allocate with the ambient (meta) device, not cuda
        with torch.device("meta"):
            return SequentialMLP(self.num_local_experts, config, submodules, pg_collection)

    # -------------------------------------------------------------------------------------------
    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """Same contract as ``SequentialMLP.forward``: tokens sorted by local expert in, (output, None) out."""
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        counts = torch.as_tensor(tokens_per_expert).to(device=x.device, dtype=torch.int32)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        hidden = grouped_linear(x, self.weight1, offsets)
        hidden = self._activation(hidden, probs)
        return grouped_linear(hidden, self.weight2, offsets), None

    def _activation(self, hidden: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """MCore MLP's unfused activation, then the routing weight per token (same op order and casts)."""
        c = self.config
        if c.gated_linear_unit:
            gate, linear = torch.chunk(hidden, 2, dim=-1)
            if (val := c.activation_func_clamp_value) is not None:
                gate = gate.clamp(min=None, max=val)
                linear = linear.clamp(min=-val, max=val)
            hidden = c.activation_func(gate) * (linear + c.glu_linear_offset)
        else:
            hidden = c.activation_func(hidden)
        return (hidden * probs.unsqueeze(-1)).to(hidden.dtype)

    def backward_dw(self):
        """Nothing deferred: weight gradients are computed in the normal backward."""

    # -------------------------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """``SequentialMLP``'s sharded state dict, over views of ``weight1``/``weight2``."""
        template = self._layout[0].sharded_state_dict(prefix, sharded_offsets, metadata)
        out, per_weight = {}, {"linear_fc1": {}, "linear_fc2": {}}
        for local_key, entry in template.items():
            parts = local_key[len(f"{prefix}local_experts."):].split(".", 2)
            expert, linear, name = int(parts[0]), parts[1], parts[2]
            if name == "weight":
                per_weight[linear][expert] = entry
            else:  # _extra_state objects: kept under SequentialMLP's local names
                out[local_key] = entry
        for linear, param_name in (("linear_fc1", "weight1"), ("linear_fc2", "weight2")):
            entries = [per_weight[linear][e] for e in range(self.num_local_experts)]
            out[f"{prefix}{param_name}"] = _stacked_factory(getattr(self, param_name), entries)
        return out


def _stacked_factory(param: torch.Tensor, expert_entries: list) -> ShardedTensorFactory:
    """One factory whose ``data`` is the stacked parameter (or, for optimizer state, a tensor of its
    shape) and which builds the per-expert entries of the template over views of it."""
    base_key = expert_entries[0].key

    @torch.no_grad()
    def build(key: str, t: torch.Tensor, replica_id, flattened_range):
        if flattened_range is not None:
            raise ConfigError(["model.moe_expert_backend: grouped_mm experts cannot save or load optimizer state "
                               "in a flattened (dp_reshardable / fully_sharded) format; training checkpoints use "
                               "the model-space format (fully_reshardable), which works"])
        # Callers rename the factory's key (MCore moves "layers.<i>." into an axis, the optimizer prepends
        # its own prefix); the same prefix rewrite applies to every key built here.
        old_prefix, new_prefix = _renamed_prefix(base_key, key)
        built = []
        for e, entry in enumerate(expert_entries):
            if isinstance(entry, ShardedTensorFactory):  # SwiGLU fc1: MCore's own w/v split, on our view
                pieces = entry.build_fn(entry.key, t[e], entry.replica_id, None)
            else:
                pieces = [dataclasses.replace(entry, data=t[e])]
            built.extend(dataclasses.replace(p, key=new_prefix + p.key[len(old_prefix):]) for p in pieces)
        return built

    @torch.no_grad()
    def merge(loaded: list) -> torch.Tensor:
        per_expert = len(loaded) // len(expert_entries)
        return torch.stack([torch.cat(loaded[e * per_expert:(e + 1) * per_expert], dim=0)
                            for e in range(len(expert_entries))])

    return ShardedTensorFactory(base_key, param, build, merge, expert_entries[0].replica_id)


def _renamed_prefix(original: str, renamed: str) -> tuple[str, str]:
    """(old prefix, new prefix) such that ``renamed == new + original[len(old):]`` (longest common suffix)."""
    n = 0
    while n < min(len(original), len(renamed)) and original[-1 - n] == renamed[-1 - n]:
        n += 1
    return original[: len(original) - n], renamed[: len(renamed) - n]


__all__ = ["GroupedMMExperts", "grouped_linear"]
