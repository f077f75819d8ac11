"""The names Megatron-Core gives tensors, in checkpoints and in module state dicts: spelled only here.

Two forms of the same tensors:

- **storage keys** (``torch_dist`` checkpoints written from ``GPTModel.sharded_state_dict()``):
  per-layer tensors are stacked over layers under ``decoder.layers.<suffix>`` (global shape
  ``[L, ...]``), routed-expert tensors over layers and experts under
  ``decoder.layers.mlp.experts.experts.<name>`` (``[L, E, ...]``);
- **module keys** (``GPTModel.state_dict()``, the plain-tensor oracle): one entry per layer,
  ``decoder.layers.<i>.<suffix>``, and per local expert
  ``decoder.layers.<i>.mlp.experts.local_experts.<e>.<name>`` (SequentialMLP).

Shapes (H hidden, F expert FFN, q = heads x kv_channels, kv = groups x kv_channels):
QKV ``[L, q+2kv, H]``, PROJ ``[L, H, q]``, ROUTER ``[L, E, H]``, EXPERT_BIAS ``[L, E]``,
EXPERT_FC1 ``[L, E, 2F, H]`` (gate rows then up rows), EXPERT_FC2 ``[L, E, H, F]``.
"""

from __future__ import annotations

import re

LAYER_PREFIX = "decoder.layers."

# Outside the layers (never touched by growth).
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"

# Suffixes under a layer (storage key = LAYER_PREFIX + suffix; module key = LAYER_PREFIX + "<i>." + suffix).
QKV_SUFFIX = "self_attention.linear_qkv.weight"
PROJ_SUFFIX = "self_attention.linear_proj.weight"
ROUTER_SUFFIX = "mlp.router.weight"
EXPERT_BIAS_SUFFIX = "mlp.router.expert_bias"
FC1_NAME = "linear_fc1.weight"
FC2_NAME = "linear_fc2.weight"
ROUTED_EXPERTS_MARKER = ".mlp.experts."

EXPERT_FC1_SUFFIX = "mlp.experts.experts." + FC1_NAME
EXPERT_FC2_SUFFIX = "mlp.experts.experts." + FC2_NAME
# The dense MLP of a non-MoE layer (``model.moe_layer_freq``).
DENSE_FC1_SUFFIX = "mlp." + FC1_NAME
DENSE_FC2_SUFFIX = "mlp." + FC2_NAME

# Stacked storage keys.
QKV = LAYER_PREFIX + QKV_SUFFIX
PROJ = LAYER_PREFIX + PROJ_SUFFIX
ROUTER = LAYER_PREFIX + ROUTER_SUFFIX
EXPERT_BIAS = LAYER_PREFIX + EXPERT_BIAS_SUFFIX
EXPERT_FC1 = LAYER_PREFIX + "mlp.experts.experts." + FC1_NAME
EXPERT_FC2 = LAYER_PREFIX + "mlp.experts.experts." + FC2_NAME
# Stacked storage keys present only with some settings: the input norm under the name both specs
# save it as (TE fuses it into linear_qkv; the local spec renames it so), q/k/v biases
# (``add_qkv_bias``), QK-norms (``qk_layernorm``) and the shared expert.
INPUT_NORM = LAYER_PREFIX + "self_attention.linear_qkv.layer_norm_weight"
QKV_BIAS = LAYER_PREFIX + "self_attention.linear_qkv.bias"
Q_NORM = LAYER_PREFIX + "self_attention.q_layernorm.weight"
K_NORM = LAYER_PREFIX + "self_attention.k_layernorm.weight"
SHARED_FC1 = LAYER_PREFIX + "mlp.shared_experts." + FC1_NAME
SHARED_FC2 = LAYER_PREFIX + "mlp.shared_experts." + FC2_NAME
SHARED_GATE = LAYER_PREFIX + "mlp.shared_experts.gate_weight"

# Multi-latent attention (``model.multi_latent_attention``; MCore's local MLA spec, ``MLASelfAttention``)
# replaces QKV, QKV_BIAS, Q_NORM, K_NORM and INPUT_NORM. Shapes (n heads, r_q/r_kv latent ranks,
# d_n/d_r/d_v head widths): Q_DOWN ``[L, r_q, H]``, Q_UP ``[L, n (d_n + d_r), r_q]`` (Q_PROJ ``[L, n (d_n + d_r),
# H]`` without r_q), KV_DOWN ``[L, r_kv + d_r, H]`` (latent rows, then the shared RoPE key rows), KV_UP
# ``[L, n (d_n + d_v), r_kv]`` (per head: key rows, then value rows), PROJ ``[L, H, n d_v]``, Q_LATENT_NORM
# ``[L, r_q]``, KV_LATENT_NORM ``[L, r_kv]``. The MLA spec keeps its input norm under its module name.
MLA_Q_DOWN = LAYER_PREFIX + "self_attention.linear_q_down_proj.weight"
MLA_Q_UP = LAYER_PREFIX + "self_attention.linear_q_up_proj.weight"
MLA_Q_PROJ = LAYER_PREFIX + "self_attention.linear_q_proj.weight"
MLA_KV_DOWN = LAYER_PREFIX + "self_attention.linear_kv_down_proj.weight"
MLA_KV_UP = LAYER_PREFIX + "self_attention.linear_kv_up_proj.weight"
MLA_Q_LATENT_NORM = LAYER_PREFIX + "self_attention.q_layernorm.weight"
MLA_KV_LATENT_NORM = LAYER_PREFIX + "self_attention.kv_layernorm.weight"
MLA_INPUT_NORM = LAYER_PREFIX + "input_layernorm.weight"

# Module keys; also the storage keys of a mixed dense/MoE stack: for any ``moe_layer_freq`` but the int 1,
# MCore's ``TransformerBlock.sharded_state_dict`` stores each layer under ``decoder.layers.<global layer>.``
# with no stacked layer axis (routed experts keep their prepended expert axis).
MODULE_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
MODULE_LOCAL_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def module_layer_key(layer_idx: int, suffix: str) -> str:
    """A module state-dict key of one layer's tensor.

    Args:
        layer_idx: the 0-based layer index.
        suffix: the tensor's name under the layer (e.g. :data:`QKV_SUFFIX`).

    Returns:
        ``decoder.layers.<layer_idx>.<suffix>``.
    """
    return f"{LAYER_PREFIX}{layer_idx}.{suffix}"


def per_layer_storage_key(layer_idx: int, suffix: str) -> str:
    """The storage key of one layer's tensor in a mixed dense/MoE stack (the module key's form).

    Args:
        layer_idx: the 0-based global layer index.
        suffix: the tensor's name under the layer, as stacked storage names it (e.g. :data:`EXPERT_FC1_SUFFIX`).

    Returns:
        ``decoder.layers.<layer_idx>.<suffix>``.
    """
    return module_layer_key(layer_idx, suffix)


def split_per_layer_key(key: str) -> tuple[int, str] | None:
    """``(layer_idx, suffix)`` of a per-layer storage key (:func:`per_layer_storage_key`); None for a
    stacked or non-layer key.

    Args:
        key: a storage key.

    Returns:
        The layer index and the suffix, or None.
    """
    m = MODULE_LAYER_RE.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def module_expert_key(layer_idx: int, expert_idx: int, name: str) -> str:
    """The module key of local expert ``expert_idx``'s tensor ``name`` in layer ``layer_idx``.

    Args:
        layer_idx: the 0-based layer index.
        expert_idx: the local expert index (SequentialMLP's ``local_experts.<e>``).
        name: the expert tensor (:data:`FC1_NAME` or :data:`FC2_NAME`).

    Returns:
        ``decoder.layers.<layer_idx>.mlp.experts.local_experts.<expert_idx>.<name>``.
    """
    return module_layer_key(layer_idx, f"mlp.experts.local_experts.{expert_idx}.{name}")


def is_layer_key(key: str) -> bool:
    """Whether ``key`` (storage or module form) names a tensor inside the decoder layers.

    Args:
        key: a storage or module key.

    Returns:
        True for keys under ``decoder.layers.``.
    """
    return key.startswith(LAYER_PREFIX)


def is_routed_expert_key(key: str) -> bool:
    """Whether ``key`` names a routed expert's tensor (not the shared expert's).

    Args:
        key: a storage or module key.

    Returns:
        True for keys under ``.mlp.experts.``.
    """
    return ROUTED_EXPERTS_MARKER in key and ".shared_experts." not in key


# ------------------------------------------------------------------------------------------------
# Layer specs: the same MoE layer stored under two sets of names.
#
# From Megatron-Core 0.16.1 ``models/gpt/gpt_layer_specs.py``:
# - the local spec (``get_gpt_layer_local_spec``) has separate norm modules and renames them in
#   storage through ``sharded_state_dict_keys_map``: ``input_layernorm.`` ->
#   ``self_attention.linear_qkv.layer_norm_`` and ``pre_mlp_layernorm.`` -> ``mlp.linear_fc1.layer_norm_``
#   (the TE names of a *dense* layer, whose fc1 fuses the norm; for an MoE layer the rename is kept);
# - the TE spec (``get_gpt_layer_with_transformer_engine_spec``) fuses the input norm into
#   ``linear_qkv`` (TELayerNormColumnParallelLinear: ``linear_qkv.layer_norm_weight``), but with
#   experts its ``pre_mlp_layernorm`` is a separate TENorm module, and its keys map only covers the
#   dense ``mlp.0``/``mlp.1``... fused-op names, so the MoE norm is stored as ``pre_mlp_layernorm.*``.
# Everything else is the same in both: q/k norms (``self_attention.{q,k}_layernorm.weight``), the
# router, and the routed experts, which SequentialMLP, GroupedMLP and TEGroupedMLP (in
# ``transformer/moe/experts.py``) all store as ``mlp.experts.experts.linear_fc{1,2}.weight`` stacked
# over [layer, expert] unless ``singleton_local_shards`` metadata asks for per-expert keys
# ``mlp.experts.experts.<global expert>.linear_fc{1,2}.weight`` (Megatron-LM does not set it by default;
# we read and write the stacked form).
# ``_extra_state`` entries (ShardedObjects; TE's FP8 metadata, None for the local linears, "fake" ones
# for GroupedMLP) carry no weights: growth never reads them, and a target writes those its own
# model asks for, with the same ``linear_qkv``/``linear_proj``/``linear_fc1``/``linear_fc2`` keys in both specs.

LOCAL_SPEC = "local"
TE_SPEC = "te"
SPECS = (LOCAL_SPEC, TE_SPEC)

# Storage-key infixes (after ``decoder.layers.``) of the pre-MLP norm's weight and bias, per spec.
PRE_MLP_NORM_PREFIX = {LOCAL_SPEC: "mlp.linear_fc1.layer_norm_", TE_SPEC: "pre_mlp_layernorm."}
# The pre-MLP norm's weight as the local spec stores it (HF import and export use the local spec's names).
LOCAL_PRE_MLP_NORM = LAYER_PREFIX + PRE_MLP_NORM_PREFIX[LOCAL_SPEC] + "weight"
EXTRA_STATE_SUFFIX = "_extra_state"
SINGLETON_EXPERT_RE = re.compile(r"^decoder\.layers\.mlp\.experts\.experts\.\d+\.")


def _pre_mlp_norm_key(spec: str, param: str) -> str:
    # local: ...layer_norm_weight / ...layer_norm_bias; TE: pre_mlp_layernorm.weight / .bias
    return LAYER_PREFIX + PRE_MLP_NORM_PREFIX[spec] + param


def spec_storage_key(key: str, from_spec: str, to_spec: str) -> str:
    """``key`` (a storage key of a model built with ``from_spec``) as ``to_spec`` names it.

    Args:
        key: a storage key.
        from_spec: :data:`LOCAL_SPEC` or :data:`TE_SPEC`, the spec whose names ``key`` uses.
        to_spec: the spec to name it for.

    Returns:
        The renamed key (only the pre-MLP norm differs between the specs); ``key`` itself otherwise.
    """
    if from_spec == to_spec:
        return key
    for param in ("weight", "bias"):
        if key == _pre_mlp_norm_key(from_spec, param):
            return _pre_mlp_norm_key(to_spec, param)
    return key


def storage_spec(stored_keys) -> str | None:
    """Which spec's names a checkpoint uses, read from its pre-MLP norm.

    Args:
        stored_keys: the checkpoint's storage keys.

    Returns:
        :data:`LOCAL_SPEC`, :data:`TE_SPEC`, or None when neither norm key is there.
    """
    stored = set(stored_keys)
    for spec in SPECS:
        if _pre_mlp_norm_key(spec, "weight") in stored:
            return spec
    return None


def has_singleton_expert_keys(stored_keys) -> bool:
    """Whether experts are stored one key per expert (``singleton_local_shards``).

    Args:
        stored_keys: the checkpoint's storage keys.

    Returns:
        True when any key matches ``decoder.layers.mlp.experts.experts.<E>.``.
    """
    return any(SINGLETON_EXPERT_RE.match(k) for k in stored_keys)


def rename_for_spec(sharded_state_dict, from_spec: str, to_spec: str) -> None:
    """Rename, in place, every sharded entry of a model's sharded state dict from one spec's names
    to the other's (ShardedTensor, ShardedObject and ShardedTensorFactory all carry ``.key``).

    Args:
        sharded_state_dict: nested dicts and lists of sharded entries; changed in place.
        from_spec: the spec the model was built with.
        to_spec: the spec whose names the checkpoint uses.
    """
    if from_spec == to_spec:
        return
    values = sharded_state_dict.values() if isinstance(sharded_state_dict, dict) else sharded_state_dict
    for v in values:
        if isinstance(v, (dict, list, tuple)):
            rename_for_spec(v, from_spec, to_spec)
        elif hasattr(v, "key") and isinstance(v.key, str):
            v.key = spec_storage_key(v.key, from_spec, to_spec)


def built_spec(use_te: bool) -> str:
    """The names a model built with (``use_te``) or without Transformer Engine stores its tensors under.

    Args:
        use_te: whether the model was built with the Transformer Engine spec.

    Returns:
        :data:`TE_SPEC` or :data:`LOCAL_SPEC`.
    """
    return TE_SPEC if use_te else LOCAL_SPEC


# Optimizer state in model space (MCore's distributed optimizer ``fully_reshardable`` format and the
# non-distributed optimizers): one tensor per parameter and state, with the parameter's global shape,
# stored as ``optimizer.state.<state>.<storage key of the parameter>``. ``param`` is the fp32 main copy.
OPTIMIZER_STATE_PREFIX = "optimizer.state."
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
MAIN_PARAM_STATE = "param"


def optimizer_state_key(state: str, model_key: str) -> str:
    """The storage key of one optimizer state of one parameter, in model space.

    Args:
        state: the state's name (``exp_avg``, ``exp_avg_sq`` or ``param``).
        model_key: the parameter's storage key.

    Returns:
        ``optimizer.state.<state>.<model_key>``.
    """
    return f"{OPTIMIZER_STATE_PREFIX}{state}.{model_key}"


def is_model_space_optimizer_key(key: str) -> bool:
    """Whether ``key`` is an Adam moment stored in model space (:func:`optimizer_state_key`).

    Args:
        key: a storage key.

    Returns:
        True for ``optimizer.state.exp_avg.*`` and ``optimizer.state.exp_avg_sq.*``.
    """
    return any(key.startswith(f"{OPTIMIZER_STATE_PREFIX}{state}.") for state in ADAM_MOMENTS)
