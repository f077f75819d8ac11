"""Typed recipe sections.

A recipe is YAML with one mapping per section (``model``, ``parallel``, ``training``,
``data``, ``checkpoint``, ``logging``, ``growth``). Each section loads into one frozen
dataclass below. ``model`` uses Megatron-Core ``TransformerConfig`` field names verbatim
(plus the few ``GPTModel`` arguments), ``parallel`` uses MCore's parallel-size names, so
the translation in ``megatron_grow.models.mcore_config`` is a checked pass-through.

Every field carries its documentation and its constraints in ``field(metadata=...)``:
``doc`` (one line), ``choices`` (allowed values), ``ge``/``gt``/``le`` (numeric bounds).
``megatron_grow.config.loader`` reads that metadata to validate and to explain errors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from megatron_grow.config.route_stats import file_sha256, per_layer_shares, read_route_stats


def spec(default: Any = None, doc: str = "", *, choices=None, ge=None, gt=None, le=None,
         factory=None, operator: bool = False) -> Any:
    """A dataclass field with its documentation and constraints attached.

    ``operator`` marks a ``GrowthConfig`` field as a growth operator's section: the field's name
    is the operator's name (``growth.order`` names it, ``growth.operators`` registers it).
    """
    metadata = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "operator": operator}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def allowed_values(meta: Mapping) -> str:
    """What a field's metadata admits, in words (``one of 'a', 'b' and >= 0``)."""
    parts = []
    if meta.get("choices") is not None:
        parts.append("one of " + ", ".join("null" if c is None else repr(c) for c in meta["choices"]))
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<=")):
        if meta.get(key) is not None:
            parts.append(f"{word} {meta[key]}")
    return " and ".join(parts)


def field_problem(value: Any, meta: Mapping, path: str) -> str | None:
    """The one place a field's value is checked against its metadata; ``None`` when allowed.

    Non-finite floats are never allowed: a NaN passes every ``<``/``>`` bound.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path}: {value!r} is not allowed; must be a finite number"
    if meta.get("choices") is not None and value not in meta["choices"]:
        return f"{path}: {value!r} is not allowed; must be {allowed_values(meta)}"
    if value is None or isinstance(value, (bool, str, tuple)) or not isinstance(value, (int, float)):
        return None
    for key, bad in (("ge", lambda v, b: v < b), ("gt", lambda v, b: v <= b), ("le", lambda v, b: v > b)):
        if meta.get(key) is not None and bad(value, meta[key]):
            return f"{path}: {value!r} is not allowed; must be {allowed_values(meta)}"
    return None


@dataclass(frozen=True)
class ModelConfig:
    """The decoder-only MoE of arXiv 2510.08008 (docs/paper.md §4)."""

    num_layers: int = spec(2, "decoder layers; which are MoE layers is model.moe_layer_freq", ge=1)
    hidden_size: int = spec(64, "model width H", ge=1)
    num_attention_heads: int = spec(4, "query heads", ge=1)
    num_query_groups: int = spec(2, "key/value heads (GQA groups); must divide num_attention_heads", ge=1)
    kv_channels: int = spec(16, "head dimension; the paper uses 128, so query width may exceed hidden_size", ge=1)
    num_moe_experts: int = spec(4, "routed experts per layer E", ge=1)
    moe_router_topk: int = spec(2, "experts activated per token k", ge=1)
    moe_ffn_hidden_size: int = spec(32, "FFN width F of one SwiGLU expert", ge=1)
    moe_layer_freq: int | tuple = spec(
        1, "which layers are MoE (Megatron-LM semantics): an int N makes layers 0, N, 2N, ... MoE and the rest "
        "dense; a list of 0/1, one per layer, names each (1 = MoE). 1 (the paper): every layer MoE. Anything "
        "but the int 1 stores layers one key per layer (MCore's non-homogeneous layout)")
    ffn_hidden_size: int | None = spec(
        None, "FFN width of the dense (SwiGLU) MLP of the non-MoE layers; null: moe_ffn_hidden_size", ge=1)
    moe_shared_expert_intermediate_size: int | None = spec(
        None, "FFN width of an always-on shared expert; null for none (the paper has none)", ge=1)
    moe_shared_expert_gate: bool = spec(
        False, "sigmoid gate (one [1, H] weight) scaling the shared expert's output (Qwen2-MoE)")
    moe_router_score_function: str = spec(
        "sigmoid", "router score function", choices=("sigmoid", "softmax"))
    moe_router_enable_expert_bias: bool = spec(
        True, "aux-loss-free load balancing through a per-expert routing bias (DeepSeek-V3 style)")
    moe_router_bias_update_rate: float = spec(1e-3, "expert-bias update rate", ge=0.0)
    moe_router_load_balancing_type: str = spec(
        "global_aux_loss", "auxiliary load-balancing loss",
        choices=("global_aux_loss", "aux_loss", "seq_aux_loss", "none"))
    moe_aux_loss_coeff: float = spec(1e-3, "coefficient of the load-balancing aux loss", ge=0.0)
    moe_router_topk_scaling_factor: float | None = spec(
        None, "scale applied to routing weights; null for none", gt=0.0)
    moe_router_pre_softmax: bool = spec(
        False, "softmax router: softmax over all experts, then top-k, weights not renormalised (HF "
        "norm_topk_prob=false); false = top-k logits, then softmax over them (norm_topk_prob=true)")
    moe_router_dtype: str | None = spec("fp32", "router compute dtype", choices=("fp32", "fp64", None))
    moe_token_dispatcher_type: str = spec(
        "alltoall", "token dispatcher; CPU mode switches alltoall to allgather",
        choices=("alltoall", "allgather"))
    moe_grouped_gemm: bool = spec(False, "fuse experts into one grouped GEMM (GPU)")
    moe_expert_backend: str = spec(
        "sequential", "how the local spec runs routed experts: sequential (MCore's SequentialMLP, one matmul pair "
        "per expert) or grouped_mm (two torch grouped GEMMs per layer, no extra packages); checkpoints are "
        "identical either way", choices=("sequential", "grouped_mm"))
    qk_layernorm: bool = spec(True, "RMSNorm on queries and keys")
    qk_layernorm_across_heads: bool = spec(
        False, "QK-norm over all heads of the projection together (OLMoE) instead of per head (Qwen3, the paper)")
    normalization: str = spec("RMSNorm", "norm type (pre-norm)", choices=("RMSNorm", "LayerNorm"))
    layernorm_epsilon: float = spec(1e-6, "norm epsilon", gt=0.0)
    gated_linear_unit: bool = spec(True, "SwiGLU experts (gate and up projection fused in fc1)")
    add_bias_linear: bool = spec(False, "biases in linear layers (the paper has none)")
    add_qkv_bias: bool = spec(False, "bias in the query/key/value projection only (Qwen2-MoE)")
    hidden_dropout: float = spec(0.0, "dropout after attention/MLP", ge=0.0, le=1.0)
    attention_dropout: float = spec(0.0, "dropout on attention probabilities", ge=0.0, le=1.0)
    init_method_std: float = spec(0.0125, "std of the normal weight init", gt=0.0)
    vocab_size: int = spec(256, "tokenizer vocabulary size before padding", ge=1)
    make_vocab_size_divisible_by: int = spec(
        128, "pad the vocabulary to a multiple of this (times TP), as Megatron-LM does", ge=1)
    seq_length: int = spec(128, "training sequence length (also the RoPE table length)", ge=1)
    position_embedding_type: str = spec("rope", "position embedding", choices=("rope",))
    rotary_base: int = spec(10000, "RoPE base", ge=1)
    rotary_percent: float = spec(1.0, "fraction of the head dimension rotated", gt=0.0, le=1.0)
    untie_embeddings_and_output_weights: bool = spec(True, "separate input embedding and output layer")
    # Grouped routing (DeepSeek-V3's n_group/topk_group; MCore names).
    moe_router_num_groups: int | None = spec(
        None, "grouped routing: experts split into this many equal contiguous groups (DeepSeek-V3 n_group); null for "
        "none", ge=1)
    moe_router_group_topk: int | None = spec(
        None, "grouped routing: groups a token may route into, ranked by the sum of their top "
        "(moe_router_topk / moe_router_group_topk) scores (DeepSeek-V3 topk_group); null without groups", ge=1)
    # Multi-latent attention (MCore MLATransformerConfig; DeepSeek-V2/V3). With it, num_query_groups and
    # kv_channels are unused: the head sizes below replace them.
    multi_latent_attention: bool = spec(
        False, "multi-latent attention (MCore MLATransformerConfig, DeepSeek-V2/V3): low-rank query and joint "
        "key/value projections; the fields q_lora_rank .. v_head_dim replace num_query_groups and kv_channels")
    q_lora_rank: int | None = spec(None, "MLA: rank of the query down-projection; null projects queries directly "
                                   "(DeepSeek-V2-Lite)", ge=1)
    kv_lora_rank: int = spec(32, "MLA: rank of the joint key/value latent", ge=1)
    qk_head_dim: int = spec(16, "MLA: per-head query/key width without position embedding", ge=1)
    qk_pos_emb_head_dim: int = spec(8, "MLA: per-head query/key width that is rotated (RoPE); its key part is one "
                                    "projection shared by all heads", ge=2)
    v_head_dim: int = spec(16, "MLA: per-head value width", ge=1)


def moe_layer_pattern(model: ModelConfig) -> tuple[int, ...]:
    """Per layer, 1 for an MoE layer and 0 for a dense one (MCore's reading of ``moe_layer_freq``:
    ``megatron/core/models/gpt/gpt_layer_specs.py: get_gpt_decoder_layer_specs``)."""
    freq = model.moe_layer_freq
    if isinstance(freq, int):
        return tuple(1 if i % freq == 0 else 0 for i in range(model.num_layers))
    return tuple(int(v) for v in freq)


def is_mixed_stack(model: ModelConfig) -> bool:
    """Whether layers are stored one key per layer: MCore does so for any ``moe_layer_freq`` but the int 1
    (``TransformerBlock.sharded_state_dict``), even a list of all ones."""
    return model.moe_layer_freq != 1


def moe_layer_problems(model: ModelConfig) -> list[str]:
    """What is wrong with ``model.moe_layer_freq`` (one line each)."""
    freq = model.moe_layer_freq
    if isinstance(freq, int):
        return [] if freq >= 1 else [f"model.moe_layer_freq: {freq!r} is not allowed; an int must be >= 1"]
    if len(freq) != model.num_layers or any(isinstance(v, bool) or v not in (0, 1) for v in freq):
        return [f"model.moe_layer_freq: {list(freq)!r} must be {model.num_layers} entries (model.num_layers), "
                "each 0 (dense) or 1 (MoE)"]
    return []


def _freq_words(freq) -> str:
    return repr(list(freq)) if isinstance(freq, tuple) else repr(freq)


def with_layer_sources(model: ModelConfig, source_layers) -> ModelConfig:
    """``model`` with ``len(source_layers)`` layers, layer ``j`` a copy of layer ``source_layers[j]``: the
    dense/MoE pattern follows the copies (an all-MoE stack stays ``moe_layer_freq: 1``)."""
    pattern = moe_layer_pattern(model)
    freq = 1 if model.moe_layer_freq == 1 else tuple(pattern[s] for s in source_layers)
    return dataclasses.replace(model, num_layers=len(source_layers), moe_layer_freq=freq)


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout, Megatron-LM names. Data parallelism is what the world size leaves."""

    tensor_model_parallel_size: int = spec(1, "TP degree", ge=1)
    pipeline_model_parallel_size: int = spec(1, "PP degree", ge=1)
    virtual_pipeline_model_parallel_size: int | None = spec(
        None, "model chunks per pipeline stage (interleaved 1F1B); null for none", ge=2)
    expert_model_parallel_size: int = spec(1, "EP degree", ge=1)
    expert_tensor_parallel_size: int | None = spec(
        None, "TP degree inside experts; null means the same as tensor_model_parallel_size", ge=1)
    context_parallel_size: int = spec(1, "CP degree", ge=1)
    sequence_parallel: bool | None = spec(
        None, "sequence parallelism; null turns it on exactly when TP > 1 (MoE with TP requires it)")
    use_distributed_optimizer: bool = spec(True, "shard optimizer state over data-parallel ranks (ZeRO-1)")


@dataclass(frozen=True)
class TrainingConfig:
    """Optimizer, schedule and batch sizes (defaults from docs/paper.md §5)."""

    micro_batch_size: int = spec(1, "sequences per micro batch per data-parallel rank", ge=1)
    global_batch_size: int = spec(8, "sequences per optimizer step", ge=1)
    train_iters: int = spec(100, "optimizer steps to train to (absolute iteration)", ge=0)
    lr: float = spec(3e-4, "peak learning rate", gt=0.0)
    min_lr: float = spec(3e-5, "learning rate at the end of decay", ge=0.0)
    lr_decay_style: str = spec("WSD", "schedule shape", choices=("WSD", "cosine", "constant", "linear"))
    lr_warmup_iters: int = spec(0, "linear warmup steps", ge=0)
    lr_rewarmup_iters: int | None = spec(
        None, "linear warmup steps of a schedule that restarts at a growth point (train --grow-from, or "
        "resuming a grown checkpoint); null: lr_warmup_iters. WSD then warms up, holds and decays from there", ge=0)
    lr_wsd_decay_iters: int = spec(0, "WSD: length of the final decay phase", ge=0)
    lr_wsd_decay_style: str = spec("linear", "WSD decay shape",
                                   choices=("linear", "cosine", "exponential", "minus_sqrt"))
    weight_decay: float = spec(0.1, "AdamW weight decay", ge=0.0)
    adam_beta1: float = spec(0.9, "AdamW beta1", ge=0.0, le=1.0)
    adam_beta2: float = spec(0.95, "AdamW beta2", ge=0.0, le=1.0)
    adam_eps: float = spec(5e-10, "AdamW epsilon", gt=0.0)
    clip_grad: float = spec(1.0, "global gradient-norm clip; 0 disables", ge=0.0)
    bf16: bool = spec(True, "bf16 weights with fp32 main grads on GPU; CPU runs always use fp32")
    seed: int = spec(1234, "base random seed", ge=0)
    eval_interval: int = spec(100, "validate every N steps", ge=1)
    eval_iters: int = spec(10, "validation batches per evaluation", ge=0)
    recompute_granularity: str | None = spec(
        None, "activation recomputation; null for none", choices=(None, "full", "selective"))


@dataclass(frozen=True)
class DataConfig:
    """Indexed datasets (``.bin``/``.idx``) and the tokenizer."""

    data_path: tuple = spec(factory=tuple, doc="dataset prefixes, optionally as [weight, prefix, weight, prefix, ...]")
    split: str = spec("98,1,1", "train,valid,test proportions")
    tokenizer_model: str | None = spec(None, "sentencepiece .model file")
    num_workers: int = spec(0, "data-loader worker processes", ge=0)
    eval_samples: int | None = spec(
        None, "validation samples to build, fixed whatever training.train_iters is: runs compared with each "
        "other set it so they are evaluated on the same tokens; null: Megatron-LM's count, (train_iters // "
        "eval_interval + 1) * eval_iters * global_batch_size, which changes with train_iters", ge=1)
    eval_seed: int | None = spec(
        None, "seed of the validation and test sample order; null: training.seed. Runs with different "
        "training seeds (init and training data order) set the same value to be evaluated on the same tokens",
        ge=0)


@dataclass(frozen=True)
class CheckpointConfig:
    """Megatron-LM checkpoint layout, torch_dist format."""

    save: str | None = spec(None, "directory to save checkpoints in")
    load: str | None = spec(None, "directory to resume from (its latest_checkpointed_iteration.txt)")
    save_interval: int = spec(100, "save every N steps", ge=1)
    keep_last: int = spec(3, "keep the newest N checkpoints; older ones are deleted after a save", ge=1)
    ckpt_format: str = spec("torch_dist", "checkpoint format", choices=("torch_dist",))
    save_optim: bool = spec(True, "save optimizer state")
    load_optim: bool = spec(True, "load optimizer state on resume")


@dataclass(frozen=True)
class LoggingConfig:
    """Console, tensorboard and wandb sinks."""

    log_interval: int = spec(10, "console line every N steps", ge=1)
    tensorboard_dir: str | None = spec(None, "tensorboard event directory; null disables")
    wandb_project: str | None = spec(None, "wandb project; null disables wandb")
    wandb_mode: str = spec("offline", "wandb mode", choices=("offline", "online", "disabled"))
    wandb_exp_name: str | None = spec(None, "wandb run name")
    peak_tflops: float | None = spec(
        None, "peak dense bf16 TFLOP/s per GPU that MFU is measured against; null looks the GPU up by name "
        "(megatron_grow/training/peak_flops.py), e.g. a measured matmul ceiling", gt=0.0)


@dataclass(frozen=True)
class Recipe:
    """A whole recipe. ``growth`` stays None unless the recipe grows a checkpoint."""

    model: ModelConfig = spec(factory=ModelConfig, doc="model architecture")
    parallel: ParallelConfig = spec(factory=ParallelConfig, doc="parallel layout")
    training: TrainingConfig = spec(factory=TrainingConfig, doc="optimizer and schedule")
    data: DataConfig = spec(factory=DataConfig, doc="data and tokenizer")
    checkpoint: CheckpointConfig = spec(factory=CheckpointConfig, doc="checkpointing")
    logging: LoggingConfig = spec(factory=LoggingConfig, doc="logging sinks")
    growth: GrowthConfig | None = spec(None, "grow the loaded checkpoint before training; null for none")


# ----------------------------------------------------------------------------------------------
# Growth: the spelled-once values of the operators' string options. ``StrEnum`` members compare
# equal to their plain-string values, so recipes, manifests and growth records keep plain strings
# (the fields below hold ``.value``s) while code compares against the members.


class DepthMode(StrEnum):
    """How depth growth orders the copies of the source layers."""

    INTERPOSITION = "interposition"   # l1,l1,l2,l2,... (the paper)
    STACK = "stack"                   # l1..ln,l1..ln


class ExpertLayout(StrEnum):
    """Where width growth puts the expert copies."""

    APPEND = "append"           # copies after all originals (the paper)
    INTERLEAVE = "interleave"   # [e0, e0', e1, e1', ...]


class NoiseKind(StrEnum):
    """What width growth adds to the expert copies."""

    GAUSSIAN = "gaussian"
    ANTITHETIC = "antithetic"
    NONE = "none"


class NoiseGranularity(StrEnum):
    """Whose std scales the noise of an expert tensor."""

    PER_EXPERT = "per_expert"
    PER_LAYER = "per_layer"


class NewExperts(StrEnum):
    """How width growth initialises the new experts."""

    COPY = "copy"
    RANDOM = "random"


class OptimizerCarry(StrEnum):
    """What the grown model's Adam state starts from (``growth.optimizer``, docs/growth.md)."""

    RESET = "reset"                     # fresh moments (the paper)
    CARRY = "carry"                     # grown through the weights' index maps
    CARRY_ZERO_NEW = "carry_zero_new"   # carry, entries new in the grown model at zero
    POLICY = "policy"                   # carry, each moment by growth.optimizer_policy


def values(kind: type[StrEnum]) -> tuple[str, ...]:
    """The plain-string values of an enum, for a field's ``choices`` (error messages quote them)."""
    return tuple(member.value for member in kind)


class GrowthSection:
    """The pure rules of one growth operator's recipe section (no tensors, no index maps).

    Each operator's section dataclass implements these two, so the recipe checks
    (``config.check``), ``plan`` and the growth engine ask the section itself instead of branching
    on its name. The operator's index maps, tensor transforms and optimizer rule live in its
    ``growth.operators`` class (docs/extending.md).
    """

    def grown_model(self, model: ModelConfig) -> ModelConfig:
        """The architecture this operator makes of ``model`` (the model before it in ``growth.order``).

        Args:
            model: the model the operator is applied to.

        Returns:
            The grown model (``model`` itself for an operator that keeps the architecture).
        """
        return model

    def source_problems(self, source: ModelConfig, prefix: str) -> list[str]:
        """The section's problems against the *source* model (what a calibration file was measured on);
        most sections have none."""
        return []

    def with_inputs(self, prefix: str) -> GrowthSection:
        """This section with the files it names read into its fields (so the growth record holds them).

        Args:
            prefix: the section's key path, for errors.

        Returns:
            The section (``self`` for one that reads no file).

        Raises:
            ConfigError: a named file is missing or malformed (one line naming its key).
        """
        return self

    def problems(self, model: ModelConfig, prefix: str) -> list[str]:
        """What is wrong with this section for ``model``, one line each naming its key under ``prefix``.

        Args:
            model: the model the operator is applied to.
            prefix: the section's key path (``growth.depth``).

        Returns:
            The problems; empty when the section fits ``model``.
        """
        return []


def grown_depth(num_layers: int, factor: int, ignore_first: int = 0, ignore_last: int = 0) -> int:
    """Target depth ``k*L - (k-1)*(first+last)``: the ignored layers appear once, the rest k times."""
    return factor * num_layers - (factor - 1) * (ignore_first + ignore_last)


def _interposition(num_layers: int, factor: int, first: int, last: int) -> list[int]:
    src: list[int] = []
    for i in range(num_layers):
        repeats = factor if first <= i < num_layers - last else 1
        src.extend([i] * repeats)
    return src


def _stack(num_layers: int, factor: int, first: int, last: int) -> list[int]:
    src = list(range(0, num_layers - last))
    for _ in range(factor - 2):
        src.extend(range(first, num_layers - last))
    if factor >= 2:
        src.extend(range(first, num_layers))
    else:  # factor 1: identity
        src.extend(range(num_layers - last, num_layers))
    return src


def depth_source_layers(num_layers: int, mode: str, factor: int, first: int = 0, last: int = 0) -> tuple[int, ...]:
    """Target layer -> source layer of depth growth (``growth.operators.depth.build_depth_map`` documents it)."""
    return tuple({DepthMode.INTERPOSITION: _interposition, DepthMode.STACK: _stack}[DepthMode(mode)](
        num_layers, factor, first, last))


@dataclass(frozen=True)
class DepthGrowthConfig(GrowthSection):
    """Depth growth: copy decoder layers (docs/paper.md §1). Copies are exact; no noise."""

    mode: str = spec(DepthMode.INTERPOSITION.value,
                     "interposition (l1,l1,l2,l2,...; the paper) or stack (l1..ln,l1..ln)", choices=values(DepthMode))
    factor: int = spec(2, "growth factor k: layers L -> k*L (less the ignored layers)", ge=2)
    ignore_first: int = spec(0, "the first N source layers appear once, not duplicated (paper scripts use 2)",
                             ge=0)
    ignore_last: int = spec(0, "the last N source layers appear once, not duplicated", ge=0)
    identity_init: bool = spec(
        False, "new copies start with attention linear_proj and (shared-)expert linear_fc2 at zero (LLaMA-Pro)")

    def grown_model(self, model: ModelConfig) -> ModelConfig:
        if self.mode not in values(DepthMode) or self.problems(model, "growth.depth"):
            # asked while the problems are being collected: the count alone
            layers = grown_depth(model.num_layers, self.factor, self.ignore_first, self.ignore_last)
            return dataclasses.replace(model, num_layers=layers)
        return with_layer_sources(model, depth_source_layers(model.num_layers, self.mode, self.factor,
                                                             self.ignore_first, self.ignore_last))

    def problems(self, model: ModelConfig, prefix: str) -> list[str]:
        if self.ignore_first + self.ignore_last >= model.num_layers:
            return [f"{prefix}.ignore_first + {prefix}.ignore_last ({self.ignore_first} + {self.ignore_last}) "
                    f"must be < the source model's num_layers ({model.num_layers})"]
        return []


@dataclass(frozen=True)
class WidthGrowthConfig(GrowthSection):
    """Width growth: duplicate experts with noise and raise top-k (docs/paper.md §2)."""

    factor: int = spec(2, "growth factor m: experts E -> m*E", ge=2)
    topk_factor: int | None = spec(
        None, "top-k k -> topk_factor*k; null means the same as factor (the paper); 1 is the E-only ablation",
        ge=1)
    expert_layout: str = spec(ExpertLayout.APPEND.value, "append (copies after all originals; the paper) "
                              "or interleave ([e0, e0', e1, e1', ...])", choices=values(ExpertLayout))
    noise: str = spec(NoiseKind.GAUSSIAN.value, "gaussian (copies get N(0,(alpha*std)^2)), antithetic (zero-sum "
                      "fc2 noise within each copy group; function-preserving), none (exact copies)",
                      choices=values(NoiseKind))
    alpha: float = spec(0.01, "noise std relative to the copied tensor's std (the paper: 0.01)", ge=0.0)
    noise_granularity: str = spec(
        NoiseGranularity.PER_EXPERT.value, "std of one expert's tensor (per_expert) or of all experts of the "
        "layer for that tensor (per_layer; the paper's fused-GEMM runs)", choices=values(NoiseGranularity))
    zero_expert_bias: bool = spec(False, "reset the whole enlarged router expert_bias to zero")
    new_experts: str = spec(NewExperts.COPY.value, "copy (the paper) or random (ablation: new experts and their "
                            "router rows re-initialised)", choices=values(NewExperts))

    @property
    def resolved_topk_factor(self) -> int:
        """How much top-k grows: ``topk_factor``, or ``factor`` when it is null (the paper)."""
        return self.topk_factor if self.topk_factor is not None else self.factor

    def grown_model(self, model: ModelConfig) -> ModelConfig:
        grown = dataclasses.replace(model, num_moe_experts=model.num_moe_experts * self.factor,
                                    moe_router_topk=model.moe_router_topk * self.resolved_topk_factor)
        if model.moe_router_num_groups is None or self.expert_layout != ExpertLayout.APPEND:
            return grown  # interleave: each copy joins its source's group; the groups grow m-fold
        # append: copy c of group g is the contiguous group c*G + g; a token may route into the m copies
        # of each group it routed into (docs/growth.md, grouped routing).
        return dataclasses.replace(grown, moe_router_num_groups=model.moe_router_num_groups * self.factor,
                                   moe_router_group_topk=model.moe_router_group_topk * self.factor)

    def problems(self, model: ModelConfig, prefix: str) -> list[str]:
        tf = self.resolved_topk_factor
        if model.moe_router_topk * tf > model.num_moe_experts * self.factor:
            return [f"{prefix}.topk_factor ({tf}): grown top-k {model.moe_router_topk * tf} "
                    f"exceeds grown experts {model.num_moe_experts * self.factor}"]
        if model.moe_router_num_groups is not None and tf != self.factor:
            return [f"{prefix}.topk_factor ({tf}) must equal {prefix}.factor ({self.factor}) with grouped routing "
                    "(model.moe_router_num_groups): only then does every group keep its ranking"]
        return []


# ---- expert upcycling ------------------------------------------------------------------------------


class ExpertAllocation(StrEnum):
    """How expert upcycling shares the new experts among the source experts."""

    UTILITY = "utility"   # largest remainder, proportional to each expert's routing share
    UNIFORM = "uniform"   # as equal as possible, the remainder to the lowest indices


@dataclass(frozen=True)
class UpcycleGrowthConfig(GrowthSection):
    """Expert upcycling: E -> E' experts for any E' > E, top-k fixed, copies chosen by utility or uniformly
    (Expert Upcycling, arXiv 2604.19835; docs/growth.md)."""

    num_experts: int = spec(16, "experts per layer after growth E' (> the experts before it; any number)", ge=2)
    allocation: str = spec(ExpertAllocation.UTILITY.value, "utility (the E'-E copies shared by largest remainder "
                           "in proportion to each expert's routing share) or uniform", choices=values(ExpertAllocation))
    utility_stats: str | None = spec(None, "route-stats JSON (megatron-grow route-stats) whose per-layer shares are "
                                     "the utility (each layer allocated on its own); required by allocation: "
                                     "utility unless utility_shares is given")
    utility_shares: tuple | None = spec(None, "utility: one row of per-expert shares per source layer (filled in from "
                                        "utility_stats by the growth, and so recorded in the lineage), or one row "
                                        "of per-expert values for every layer, given directly")
    utility_stats_sha256: str | None = spec(None, "SHA-256 of utility_stats; filled in by the growth")
    expert_layout: str = spec(ExpertLayout.APPEND.value, "append (all copies after the originals, in source-expert "
                              "order) or interleave (each expert followed by its copies)", choices=values(ExpertLayout))
    bias_noise: float = spec(0.0, "std of the N(0, std^2) added to each copy's router expert_bias (absolute; the "
                             "only perturbation: weights and router rows are exact copies)", ge=0.0)
    unselected_copies: bool = spec(
        False, "copies' expert_bias start at min(source bias) - 2 - bias_noise*|N(0,1)|: no token selects a copy, "
        "so the grown model computes the source's function exactly (sigmoid routing with expert bias only); the "
        "aux-loss-free bias update then raises the unused copies")

    def with_inputs(self, prefix: str) -> UpcycleGrowthConfig:
        if self.utility_stats is None or self.utility_shares is not None:
            return self  # nothing to read, or already read (a growth record rebuilt by verify)
        stats = read_route_stats(self.utility_stats, f"{prefix}.utility_stats")
        return dataclasses.replace(self, utility_shares=per_layer_shares(stats["shares"]),
                                   utility_stats_sha256=file_sha256(self.utility_stats))

    def grown_model(self, model: ModelConfig) -> ModelConfig:
        return dataclasses.replace(model, num_moe_experts=self.num_experts)

    def problems(self, model: ModelConfig, prefix: str) -> list[str]:
        E, out = model.num_moe_experts, []
        if is_mixed_stack(model):
            out.append(f"{prefix}: the source stores its layers one key per layer (model.moe_layer_freq "
                       f"{_freq_words(model.moe_layer_freq)}); upcycle grows all-MoE stacks only: use growth.width")
        if self.num_experts <= E:
            out.append(f"{prefix}.num_experts ({self.num_experts}) must be > the experts it grows ({E})")
        if model.moe_router_num_groups is not None:
            out.append(f"{prefix}: expert upcycling of a grouped router (model.moe_router_num_groups="
                       f"{model.moe_router_num_groups}) is not defined: uneven copies break the equal groups")
        if self.bias_noise > 0 and not model.moe_router_enable_expert_bias:
            out.append(f"{prefix}.bias_noise ({self.bias_noise}) needs model.moe_router_enable_expert_bias: true")
        if self.unselected_copies and not (model.moe_router_enable_expert_bias
                                           and model.moe_router_score_function == "sigmoid"):
            out.append(f"{prefix}.unselected_copies needs model.moe_router_score_function: sigmoid and "
                       "model.moe_router_enable_expert_bias: true (the bias then steers selection only)")
        if self.allocation != ExpertAllocation.UTILITY:
            return out
        shares = self.utility_shares
        if shares is None and self.utility_stats is None:
            out.append(f"{prefix}.utility_stats: required by allocation: utility (or give utility_shares)")
        elif shares is not None:
            out.extend(_shares_problems(shares, E, f"{prefix}.utility_shares"))
        return out

    def layer_rows(self) -> tuple[tuple, ...] | None:
        """The utility as per-layer rows (None for uniform allocation); a single row stands for every layer."""
        shares = self.utility_shares
        if self.allocation != ExpertAllocation.UTILITY or shares is None:
            return None
        return tuple(tuple(r) for r in shares) if shares and isinstance(shares[0], (list, tuple)) else (tuple(shares),)

    def source_problems(self, source: ModelConfig, prefix: str) -> list[str]:
        rows = self.layer_rows()
        if rows is None or len(rows) in (1, source.num_layers):
            return []
        return [f"{prefix}.utility_shares: {len(rows)} layer rows for the source's {source.num_layers} layers"]


def _shares_problems(shares: tuple, num_experts: int, key: str) -> list[str]:
    """Problems of ``utility_shares``: one row of per-expert values, or one such row per layer."""
    rows = shares if shares and all(isinstance(r, (list, tuple)) for r in shares) else (shares,)
    for row in rows:
        if len(row) != num_experts:
            return [f"{key}: {len(row)} values for {num_experts} experts"]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                   for x in row):
            return [f"{key}: every value must be a finite number >= 0"]
    return []


# ---- depth by insertion (LLaMA Pro block expansion) ---------------------------------------------


def insertion_points(num_layers: int, every: int | None, after: tuple) -> tuple[int, ...]:
    """The source layers a new block is inserted after, ascending, one entry per new block.

    ``every: k`` inserts one block after source layers ``k-1, 2k-1, ...`` (LLaMA Pro's groups of k);
    ``after`` lists the source layers explicitly (a layer listed twice gets two blocks).
    """
    if every is not None:
        return tuple(range(every - 1, num_layers, every))
    return tuple(sorted(after))


def insertion_sources(num_layers: int, points: tuple[int, ...]) -> tuple[int, ...]:
    """Target layer -> source layer: each source layer, then one copy of it per time it is in ``points``.

    Args:
        num_layers: source layers L.
        points: source layers to insert after (:func:`insertion_points`).

    Returns:
        ``L + len(points)`` source indices; a new block is every non-first occurrence.
    """
    src: list[int] = []
    for layer in range(num_layers):
        src.append(layer)
        src.extend([layer] * points.count(layer))
    return tuple(src)


@dataclass(frozen=True)
class InsertGrowthConfig(GrowthSection):
    """Depth by insertion (LLaMA Pro): L -> L + n layers, each new block a copy of the source layer
    before it with its attention linear_proj and (shared-)expert linear_fc2 at zero, so it starts as
    the identity on the residual stream (docs/growth.md)."""

    every: int | None = spec(None, "insert one new block after every k-th source layer (after layers k-1, 2k-1, "
                             "...); null to list the positions in 'after'", ge=1)
    after: tuple = spec(factory=tuple, doc="source layers (0-based) to insert a new block after; a layer listed "
                        "n times gets n blocks; empty when 'every' is set")

    def grown_model(self, model: ModelConfig) -> ModelConfig:
        points = insertion_points(model.num_layers, self.every, self.after)
        return with_layer_sources(model, insertion_sources(model.num_layers, points))

    def problems(self, model: ModelConfig, prefix: str) -> list[str]:
        if (self.every is None) == (not self.after):
            return [f"{prefix}: set exactly one of {prefix}.every and {prefix}.after"]
        bad = [p for p in self.after if isinstance(p, bool) or not isinstance(p, int)
               or not 0 <= p < model.num_layers]
        if bad:
            return [f"{prefix}.after: {bad} are not source layer indices in [0, {model.num_layers})"]
        if self.every is not None and self.every > model.num_layers:
            return [f"{prefix}.every ({self.every}) must be <= the source model's num_layers ({model.num_layers})"]
        return []



# ---- optimizer state by policy ---------------------------------------------------------------------


class MomentRule(StrEnum):
    """What one Adam moment of a grown entry starts from, given the carried value ``c`` (docs/growth.md)."""

    COPY = "copy"                 # c
    SCALE = "scale"               # factor * c
    INTERPOLATE = "interpolate"   # factor * c + (1 - factor) * toward
    RESET = "reset"               # 0


class ParamKind(StrEnum):
    """The kinds of grown tensors an optimizer policy names."""

    EXPERTS = "experts"         # routed and shared experts' fc1/fc2
    ROUTER = "router"           # the router weight
    ATTENTION = "attention"     # linear_qkv, linear_proj
    NORMS = "norms"             # every norm weight (input, pre-MLP, QK, final)
    EMBEDDINGS = "embeddings"   # word embedding and output layer


@dataclass(frozen=True)
class MomentPolicy:
    """The rule for the first (``exp_avg``) and second (``exp_avg_sq``) Adam moments, independently."""

    exp_avg: str = spec(MomentRule.COPY.value, "first moment: copy, scale, interpolate or reset",
                        choices=values(MomentRule))
    exp_avg_sq: str = spec(MomentRule.COPY.value, "second moment: copy, scale, interpolate or reset",
                           choices=values(MomentRule))
    exp_avg_factor: float = spec(1.0, "first moment: the factor of scale / the weight of the carried value in "
                                 "interpolate", ge=0.0)
    exp_avg_sq_factor: float = spec(1.0, "second moment: the factor of scale / the weight of the carried value in "
                                    "interpolate", ge=0.0)
    exp_avg_toward: float = spec(0.0, "first moment: the value interpolate moves towards")
    exp_avg_sq_toward: float = spec(0.0, "second moment: the value interpolate moves towards", ge=0.0)

    def rule(self, moment: str) -> tuple[str, float, float]:
        """(rule, factor, toward) of ``moment`` (``exp_avg`` or ``exp_avg_sq``)."""
        return getattr(self, moment), getattr(self, f"{moment}_factor"), getattr(self, f"{moment}_toward")


@dataclass(frozen=True)
class KindPolicy:
    """One kind's rules for its original entries and its copies; null falls back to the policy's own."""

    originals: MomentPolicy | None = spec(None, "entries that existed in the source; null: the policy's originals")
    copies: MomentPolicy | None = spec(None, "entries new in the grown model; null: the policy's copies")


@dataclass(frozen=True)
class OptimizerPolicyConfig:
    """``growth.optimizer: policy``: each grown tensor's Adam moments by kind and by original vs copy.

    Copies are the entries ``carry_zero_new`` zeroes: whole new layers (depth copies, inserted
    blocks), expert copies and their router rows. Adam's step is kept, as with ``carry``.
    """

    originals: MomentPolicy = spec(factory=MomentPolicy, doc="default rule for entries that existed in the source")
    copies: MomentPolicy = spec(factory=MomentPolicy, doc="default rule for entries new in the grown model")
    experts: KindPolicy | None = spec(None, "routed and shared experts; null: the defaults")
    router: KindPolicy | None = spec(None, "router weight rows; null: the defaults")
    attention: KindPolicy | None = spec(None, "attention linear_qkv and linear_proj; null: the defaults")
    norms: KindPolicy | None = spec(None, "norm weights; null: the defaults")
    embeddings: KindPolicy | None = spec(None, "embedding and output layer (never copies); null: the defaults")

    @classmethod
    def from_record(cls, record: Mapping | None) -> OptimizerPolicyConfig | None:
        """The policy a growth record stores (``dataclasses.asdict`` of it), or None."""
        if record is None:
            return None

        def rule(d):
            return MomentPolicy(**d) if d is not None else None

        kinds = {k: KindPolicy(rule(v.get("originals")), rule(v.get("copies"))) if v is not None else None
                 for k, v in record.items() if k not in ("originals", "copies")}
        return cls(originals=MomentPolicy(**record["originals"]), copies=MomentPolicy(**record["copies"]), **kinds)

    def policy_for(self, kind: str | None, is_copy: bool) -> MomentPolicy:
        """The rule of an entry of ``kind`` (None: a tensor of no named kind) that is a copy or an original."""
        member = "copies" if is_copy else "originals"
        by_kind = getattr(self, kind) if kind is not None else None
        chosen = getattr(by_kind, member) if by_kind is not None else None
        return chosen if chosen is not None else getattr(self, member)



@dataclass(frozen=True)
class GrowthConfig:
    """Grow a converged checkpoint (arXiv 2510.08008); a null operator section means that operator is off."""

    order: tuple = spec(factory=tuple, doc="operators in the order applied, e.g. [depth, width]; each at most "
                        "once and exactly the non-null sections; empty means depth then width")
    # One field per operator (``operator=True``), in the default order (docs/extending.md).
    depth: DepthGrowthConfig | None = spec(None, "depth growth; null for none", operator=True)
    width: WidthGrowthConfig | None = spec(None, "width growth; null for none", operator=True)
    upcycle: UpcycleGrowthConfig | None = spec(None, "expert upcycling (E -> any E' > E, top-k fixed); null for none",
                                               operator=True)
    insert: InsertGrowthConfig | None = spec(
        None, "depth by insertion (LLaMA Pro): identity-initialised new blocks; null for none", operator=True)
    seed: int = spec(1234, "seed of the growth noise (keyed with tensor, layer and expert, never with rank)",
                     ge=0)
    optimizer: str = spec(OptimizerCarry.RESET.value, "reset (fresh Adam state; the paper), carry (Adam moments "
                          "and step grown through the weights' index maps) or carry_zero_new (carry, new entries at "
                          "zero moments)",
                          choices=values(OptimizerCarry))
    optimizer_policy: OptimizerPolicyConfig | None = spec(
        None, "with optimizer: policy, the rule for each grown tensor's Adam moments (docs/growth.md); null otherwise")

    @classmethod
    def operator_names(cls) -> tuple[str, ...]:
        """Every operator a recipe may name, in the default order (the fields marked ``operator``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("operator"))

    def sections(self) -> dict[str, GrowthSection]:
        """The operators this growth switches on (their non-null sections), by name, in the default order."""
        return {name: getattr(self, name) for name in self.operator_names() if getattr(self, name) is not None}
