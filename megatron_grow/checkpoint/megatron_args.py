"""Megatron-LM's ``args`` (the ``argparse.Namespace`` in a checkpoint's ``common.pt``), read and written.

Megatron-LM's ``pretrain_gpt.py`` stores its whole parsed command line in every checkpoint
(``state_dict['args']``, next to ``checkpoint_version``, ``iteration`` and
``num_floating_point_operations_so_far``); its ``load_checkpoint`` / ``check_checkpoint_args``
read it back. Names follow ``megatron/training/arguments.py``: most architecture arguments
are ``TransformerConfig`` field names (``ArgumentGroupFactory(TransformerConfig)``), with
these differences this module spells out:

======================================  =========================================================
Megatron-LM argument                    ``ModelConfig`` field
======================================  =========================================================
``num_experts``                         ``num_moe_experts``
``swiglu``                              ``gated_linear_unit`` (must be true: SwiGLU experts)
``norm_epsilon`` (older releases)       ``layernorm_epsilon``
``group_query_attention`` + groups      ``num_query_groups`` (= heads without GQA)
``kv_channels`` (None: hidden/heads)    ``kv_channels``
``moe_ffn_hidden_size`` (None: ffn)     ``moe_ffn_hidden_size``
``padded_vocab_size``, ``vocab_size``   ``vocab_size`` + ``make_vocab_size_divisible_by``
``seq_length`` (None: max positions)    ``seq_length``
``moe_layer_freq`` (int, list, or the   ``moe_layer_freq`` (1, an int N, or the 0/1 tuple)
list expression ``([0]*1+[1]*3)``)
``ffn_hidden_size``                     ``ffn_hidden_size`` of the dense layers (when any)
``moe_shared_expert_intermediate_size``  ``moe_shared_expert_intermediate_size``, ``moe_shared_expert_gate``
and ``moe_shared_expert_gate``          (``moe_shared_expert_overlap`` is a schedule choice: not carried)
``multi_latent_attention`` + ``q_lora_  the MLA fields of the same names; ``rope_type`` must be
rank`` .. ``v_head_dim``                ``rope`` (YaRN is refused, as is a missing ``rope_type``)
``moe_router_num_groups``/``_group_     the same names (grouped routing)
topk``
======================================  =========================================================

What the model cannot represent (multi-token prediction, positions other than RoPE, biases, ...)
is refused with one line naming the argument and its value, never replaced by a default.
Implementation choices that do not change the weights (``moe_grouped_gemm``, the token
dispatcher, fusions) are not carried: this run picks its own.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from typing import Any

from megatron_grow.config.check import model_problems
from megatron_grow.config.layout_rules import expert_tensor_parallel_size, padded_vocab_size
from megatron_grow.config.schema import ModelConfig, ParallelConfig, TrainingConfig, field_problem
from megatron_grow.errors import CheckpointError

# Megatron-LM's own checkpoint format version (``state_dict['checkpoint_version']``).
CHECKPOINT_VERSION = 3.0

# Arguments whose value maps unchanged onto the ModelConfig field of the same name.
SAME_NAME_ARGS = (
    "num_layers", "hidden_size", "num_attention_heads", "moe_router_topk", "moe_shared_expert_intermediate_size",
    "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_bias_update_rate",
    "moe_router_topk_scaling_factor", "moe_router_pre_softmax", "moe_router_dtype", "qk_layernorm",
    "normalization", "untie_embeddings_and_output_weights", "position_embedding_type", "rotary_base",
    "rotary_percent", "init_method_std", "hidden_dropout", "attention_dropout", "layernorm_epsilon",
)


def _off(value: Any) -> bool:
    return value is None or value is False or value == 0


def moe_layer_freq_of(value: Any, where: str) -> int | tuple:
    """Megatron-LM's ``--moe-layer-freq`` as ``model.moe_layer_freq``: an int, a list of 0/1, or the list
    expression the command line takes (``"([0]*1+[1]*3)"``, which its ``moe_freq_type`` evaluates; here only
    lists of integers, ``+`` and ``*`` are read, nothing is executed)."""
    if isinstance(value, str):
        try:
            value = _list_expression(ast.parse(value.strip(), mode="eval").body)
        except (SyntaxError, ValueError) as e:
            raise CheckpointError(f"{where}: args.moe_layer_freq={value!r} is not an int or a list expression "
                                  f"like ([0]*1+[1]*3): {e}") from None
    if isinstance(value, (list, tuple)):
        value = tuple(value)
    if not (isinstance(value, int) and value >= 1) and not (isinstance(value, tuple) and value
                                                             and all(v in (0, 1) for v in value)):
        shown = list(value) if isinstance(value, tuple) else value
        raise CheckpointError(f"{where}: args.moe_layer_freq={shown!r} is not an int >= 1 or a list of 0 "
                              "(dense) and 1 (MoE)")
    return value


def _list_expression(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.List):
        return [_list_expression(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _list_expression(node.left), _list_expression(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise ValueError(f"{ast.dump(node)[:40]} is not allowed")


# (argument, accepted(value), what a refused value means). Missing arguments count as accepted
# unless ``required`` below says otherwise.
UNSUPPORTED = (
    ("num_experts", lambda v: isinstance(v, int) and v > 0, "a dense model; megatron-grow grows MoE models"),
    ("mtp_num_layers", _off, "multi-token prediction layers"),
    ("position_embedding_type", lambda v: v == "rope", "position embeddings other than RoPE"),
    ("swiglu", lambda v: v is True, "non-gated (GeLU) experts; only SwiGLU experts are supported"),
    ("squared_relu", _off, "squared-ReLU activation"),
    ("quick_geglu", _off, "quick-GeGLU activation"),
    ("add_bias_linear", _off, "biases in linear layers"),
    ("add_qkv_bias", _off, "biases in the QKV projection"),
    ("apply_layernorm_1p", _off, "zero-centred (1 + gamma) norms"),
    ("layernorm_zero_centered_gamma", _off, "zero-centred (1 + gamma) norms"),
    ("rotary_interleaved", _off, "interleaved RoPE"),
    ("use_rope_scaling", _off, "Llama-3 RoPE scaling"),
    ("no_rope_freq", _off, "layers without RoPE"),
    ("qk_l2_norm", _off, "L2-normalised queries and keys"),
    ("softmax_type", lambda v: v in (None, "vanilla"), "a non-standard attention softmax"),
    ("window_size", _off, "sliding-window attention"),
    ("attention_output_gate", _off, "gated attention output"),
    ("experimental_attention_variant", _off, "an experimental attention variant"),
    ("linear_attention_freq", _off, "linear-attention layers"),
    ("hybrid_override_pattern", _off, "a hybrid (Mamba) layer pattern"),
    ("hybrid_layer_pattern", _off, "a hybrid (Mamba) layer pattern"),
    ("heterogeneous_layers_config_path", _off, "heterogeneous layers"),
    ("heterogeneous_layers_config_encoded_json", _off, "heterogeneous layers"),
    ("moe_latent_size", _off, "latent MoE projections"),
    ("moe_apply_probs_on_input", _off, "routing probabilities applied to the expert input"),
    ("glu_linear_offset", _off, "an offset inside the GLU"),
    ("activation_func_clamp_value", _off, "a clamped activation"),
)


# Megatron-LM's defaults where they differ from this model: an argument missing from ``args``
# means its default, which is then refused like any other value.
MEGATRON_DEFAULTS = {"swiglu": False, "position_embedding_type": "learned_absolute"}


MLA_ARGS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
GROUPED_ROUTING_ARGS = ("moe_router_num_groups", "moe_router_group_topk")


def _mla_refusals(values: dict, where: str) -> list[str]:
    """MLA maps with plain RoPE only; Megatron-LM's MLA default (``rope_type`` unset) is MCore's YaRN."""
    if not values.get("multi_latent_attention"):
        return []
    if values.get("rope_type") != "rope":
        return [f"{where}: args.rope_type={values.get('rope_type')!r} with multi-latent attention is not supported; "
                "only rope_type='rope' (plain RoPE) is"]
    if values.get("mscale_all_dim") and (values.get("rotary_scaling_factor") or 1) > 1:
        # MCore scales MLA's softmax by its YaRN mscale even with rope_type='rope'.
        return [f"{where}: args.mscale_all_dim={values['mscale_all_dim']!r} with args.rotary_scaling_factor="
                f"{values['rotary_scaling_factor']!r} (a scaled MLA softmax) is not supported"]
    return []


def _refusals(values: dict, where: str) -> list[str]:
    out = _mla_refusals(values, where)
    for name, accepted, meaning in UNSUPPORTED:
        if name not in values and name not in MEGATRON_DEFAULTS:
            continue
        value = values.get(name, MEGATRON_DEFAULTS.get(name))
        if not accepted(value):
            missing = "" if name in values else " (missing, so Megatron-LM's default)"
            out.append(f"{where}: args.{name}={value!r}{missing} ({meaning}) is not supported")
    if "num_experts" not in values:
        out.append(f"{where}: args.num_experts is missing (a dense model?); megatron-grow grows MoE models")
    return out


def _single(values: dict, name: str, where: str) -> Any:
    """Megatron-LM accepts a list for some MoE arguments (one entry per loss); ours holds one."""
    v = values.get(name)
    if isinstance(v, (list, tuple)):
        if len(v) != 1:
            raise CheckpointError(f"{where}: args.{name}={list(v)!r} (several load-balancing losses) is not "
                                  "supported; megatron-grow uses one")
        return v[0]
    return v


def _vocabulary(values: dict, where: str) -> dict:
    """``vocab_size`` and its padding rule, from ``padded_vocab_size`` (always set by Megatron-LM's
    tokenizer build) and ``vocab_size`` (set only by some tokenizers)."""
    padded, vocab = values.get("padded_vocab_size"), values.get("vocab_size")
    divisible = values.get("make_vocab_size_divisible_by") or 128
    tp = values.get("tensor_model_parallel_size") or 1
    if not padded and not vocab:
        raise CheckpointError(f"{where}: args.padded_vocab_size is missing; pass --source-config")
    if not vocab:
        # Only the padded size is known: it is the vocabulary (padding rows count as tokens).
        return {"vocab_size": int(padded), "make_vocab_size_divisible_by": 1}
    multiple = divisible * tp
    expected = -(-int(vocab) // multiple) * multiple
    if padded and expected != padded:
        raise CheckpointError(f"{where}: args.padded_vocab_size={padded} does not follow from args.vocab_size="
                              f"{vocab}, make_vocab_size_divisible_by={divisible} and TP={tp} ({expected})")
    return {"vocab_size": int(vocab), "make_vocab_size_divisible_by": int(divisible)}


def _picked_fields(values: dict, where: str) -> dict:
    picked = {name: values[name] for name in SAME_NAME_ARGS if values.get(name) is not None}
    if values.get("norm_epsilon") is not None:
        picked["layernorm_epsilon"] = values["norm_epsilon"]
    picked["num_moe_experts"] = values["num_experts"]
    picked["gated_linear_unit"] = True
    picked["add_bias_linear"] = False
    heads = values.get("num_attention_heads")
    picked["num_query_groups"] = values.get("num_query_groups") if values.get("group_query_attention") else heads
    picked["kv_channels"] = values.get("kv_channels") or (values["hidden_size"] // heads)
    picked["moe_ffn_hidden_size"] = values.get("moe_ffn_hidden_size") or values.get("ffn_hidden_size")
    freq = moe_layer_freq_of(values.get("moe_layer_freq", 1), where)
    if isinstance(freq, tuple) and len(freq) != values.get("num_layers"):
        raise CheckpointError(f"{where}: args.moe_layer_freq={list(freq)!r} has {len(freq)} entries for "
                              f"args.num_layers={values.get('num_layers')}")
    if freq != 1:  # dense layers: their MLP is --ffn-hidden-size wide
        picked["moe_layer_freq"] = freq
        picked["ffn_hidden_size"] = values.get("ffn_hidden_size")
    picked["moe_shared_expert_gate"] = bool(values.get("moe_shared_expert_gate"))
    picked["seq_length"] = values.get("seq_length") or values.get("max_position_embeddings")
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        if values.get(name) is not None:
            picked[name] = _single(values, name, where)
    picked.update(_vocabulary(values, where))
    picked.update({name: values.get(name) for name in GROUPED_ROUTING_ARGS})
    if values.get("multi_latent_attention"):
        picked.update({name: values.get(name) for name in MLA_ARGS}, multi_latent_attention=True)
        picked["num_query_groups"], picked["kv_channels"] = heads, values.get("v_head_dim")
    return {k: v for k, v in picked.items() if v is not None or k == "q_lora_rank"}


# ModelConfig field -> the Megatron-LM argument it came from (for error lines).
_ARG_OF_FIELD = {"num_moe_experts": "num_experts", "gated_linear_unit": "swiglu", "seq_length": "seq_length",
                 "vocab_size": "padded_vocab_size"}


def model_config_from_args(args: Any, where: str = "Megatron-LM args in common.pt") -> ModelConfig:
    """The architecture a Megatron-LM ``args`` namespace describes; one line per refused argument.

    Args:
        args: the ``argparse.Namespace`` (or a dict of it) from ``common.pt``.
        where: where it came from, named in every message.

    Returns:
        The model configuration.

    Raises:
        CheckpointError: an argument the model cannot represent, or a required one missing.
    """
    values = dict(args) if isinstance(args, dict) else dict(vars(args))
    problems = _refusals(values, where)
    for required in ("num_layers", "hidden_size", "num_attention_heads"):
        if not values.get(required):
            problems.append(f"{where}: args.{required} is missing")
    if problems:
        raise CheckpointError(problems[0] if len(problems) == 1 else "\n  ".join(problems))
    picked = _picked_fields(values, where)
    for f in dataclasses.fields(ModelConfig):
        if f.name in picked:
            arg = _ARG_OF_FIELD.get(f.name, f.name)
            problem = field_problem(picked[f.name], f.metadata, f"args.{arg}")
            if problem:
                problems.append(f"{where}: {problem}")
    if problems:
        raise CheckpointError("\n  ".join(problems))
    model = ModelConfig(**picked)
    problems = [f"{where}: {_in_args_terms(p)}" for p in model_problems(model)]
    if problems:
        raise CheckpointError("\n  ".join(problems))
    return model


def _in_args_terms(problem: str) -> str:
    """A model-rule message with each ``model.<field>`` named as the Megatron-LM argument it came from."""
    return re.sub(r"\bmodel\.(\w+)", lambda m: f"args.{_ARG_OF_FIELD.get(m.group(1), m.group(1))}", problem)


def _architecture_args(model: ModelConfig, tp: int) -> dict:
    """The model's Megatron-LM architecture arguments (the inverse of :func:`model_config_from_args`)."""
    arch = {name: getattr(model, name) for name in SAME_NAME_ARGS}
    freq = model.moe_layer_freq
    arch.update(
        ffn_hidden_size=model.ffn_hidden_size or model.moe_ffn_hidden_size, group_query_attention=model.num_query_groups
        != model.num_attention_heads, num_query_groups=model.num_query_groups, kv_channels=model.kv_channels,
        num_experts=model.num_moe_experts, moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_layer_freq=list(freq) if isinstance(freq, tuple) else freq,
        moe_shared_expert_gate=model.moe_shared_expert_gate,
        swiglu=model.gated_linear_unit, add_bias_linear=model.add_bias_linear, add_qkv_bias=model.add_bias_linear,
        multi_latent_attention=model.multi_latent_attention, mtp_num_layers=None, norm_epsilon=model.layernorm_epsilon,
        max_position_embeddings=model.seq_length, add_position_embedding=True,
        vocab_size=model.vocab_size, padded_vocab_size=padded_vocab_size(model, tp),
    )
    arch.update({name: getattr(model, name) for name in GROUPED_ROUTING_ARGS})
    if model.multi_latent_attention:
        arch.update({name: getattr(model, name) for name in MLA_ARGS}, rope_type="rope")
    arch.update(moe_aux_loss_coeff=model.moe_aux_loss_coeff,
                moe_router_load_balancing_type=model.moe_router_load_balancing_type,
                make_vocab_size_divisible_by=model.make_vocab_size_divisible_by, seq_length=model.seq_length,
                moe_token_dispatcher_type=model.moe_token_dispatcher_type, moe_grouped_gemm=model.moe_grouped_gemm)
    return arch


def megatron_args(model: ModelConfig, parallel: ParallelConfig, *, counters: dict, world_size: int,
                  training: TrainingConfig | None = None, optimizer_saved: bool = False,
                  base: Any = None) -> argparse.Namespace:
    """The ``args`` a checkpoint we write carries, so Megatron-LM can resume it and
    :func:`model_config_from_args` reads the same architecture back.

    ``base`` (the source checkpoint's own ``args``, when it has them) is carried forward under
    ours: the tokenizer arguments (``tokenizer_type``, ``vocab_file``, ``vocab_size``,
    ``make_vocab_size_divisible_by``), which ``check_checkpoint_args`` compares and which we do
    not model, stay what the user's launcher passes.

    ``no_save_rng`` is always set: our RNG state is not in Megatron-LM's layout (a ShardedObject
    over (PP, TP) holding a per-DP list), so its ``load_checkpoint`` must not ask for it.
    ``no_save_optim`` is set when the checkpoint has no optimizer state (a grown checkpoint).

    Args: ``model``, ``parallel`` (the layout written), ``counters``, ``world_size``, ``training`` (batch
    sizes and LR schedule, when there is one), ``optimizer_saved``, ``base`` (see above). Returns: the
    ``argparse.Namespace`` to store as ``args``.
    """
    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    arch = _architecture_args(model, tp)
    layout = dict(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size(parallel),
        context_parallel_size=parallel.context_parallel_size,
        use_distributed_optimizer=parallel.use_distributed_optimizer, world_size=world_size,
        data_parallel_size=world_size // (tp * pp * parallel.context_parallel_size),
    )
    state = dict(iteration=counters["iteration"], consumed_train_samples=counters.get("consumed_samples", 0),
                 consumed_valid_samples=0, ckpt_format="torch_dist", use_dist_ckpt=True,
                 no_save_optim=not optimizer_saved, no_save_rng=True,
                 dist_ckpt_optim_fully_reshardable=optimizer_saved)  # our optimizer state is in model space
    if training is not None:
        state.update({f.name: getattr(training, f.name) for f in dataclasses.fields(TrainingConfig)
                      if f.name not in ("bf16",)}, bf16=training.bf16)
    values = dict(vars(base)) if base is not None and not isinstance(base, dict) else dict(base or {})
    kept = {k: values[k] for k in _TOKENIZER_ARGS if k in values}
    values.update(arch, **layout, **state)
    values.update(kept)
    return argparse.Namespace(**values)


# Kept from a source's own args (see megatron_args): tokenizer settings we do not model.
_TOKENIZER_ARGS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size",
                   "make_vocab_size_divisible_by", "vocab_extra_ids")


def megatron_common_state(args: argparse.Namespace, counters: dict) -> dict:
    """The non-sharded entries Megatron-LM's ``load_checkpoint`` reads, named as it names them.

    Args:
        args: the ``args`` namespace to store (:func:`megatron_args`).
        counters: the run's counters (``iteration``, optionally ``flops_so_far``).

    Returns:
        ``args``, ``checkpoint_version``, ``iteration`` and ``num_floating_point_operations_so_far``.
    """
    return {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": counters["iteration"],
        "num_floating_point_operations_so_far": counters.get("flops_so_far", 0),
    }


def common_state(counters: dict, manifest: dict, args=None) -> dict:
    """Non-sharded entries of a checkpoint: Megatron-LM's (``args``, ``checkpoint_version``,
    ``iteration``, FLOPs so far) and our manifest.

    Args:
        counters: the run's counters (``iteration``, optionally ``flops_so_far``).
        manifest: our manifest (``checkpoint.manifest.build_manifest``), stored as ``megatron_grow``.
        args: Megatron-LM's ``args`` namespace to store; None leaves the ``args`` entry out.

    Returns:
        The dict to merge into the state dict handed to ``dist_checkpointing.save``.
    """
    state = megatron_common_state(args, counters) if args is not None else {
        k: v for k, v in megatron_common_state(None, counters).items() if k != "args"}
    state["megatron_grow"] = manifest
    return state
