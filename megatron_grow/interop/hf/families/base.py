"""What every supported ``transformers`` MoE class shares: the Llama-style attention block, RMSNorm,
RoPE, SwiGLU experts, and the checks that refuse anything our Megatron-Core model cannot reproduce.

A family turns an HF ``config.json`` dict into :class:`ModelConfig` fields (``read_config``) and
back (``write_config``); both raise :class:`InteropError` naming the setting that does not map.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_grow.config.schema import ModelConfig, moe_layer_pattern
from megatron_grow.errors import InteropError

# Our default training sequence length for an imported model (HF configs give only the maximum).
DEFAULT_IMPORT_SEQ_LENGTH = 4096


@dataclass(frozen=True)
class Naming:
    """On-disk tensor names inside ``model.layers.{i}.`` (safetensors, not ``transformers``' in-memory names)."""

    moe_block: str = "mlp"                               # holds ``gate`` (router) and ``experts``
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert: str | None = None                     # e.g. ``mlp.shared_expert``
    shared_expert_gate: str | None = None                # e.g. ``mlp.shared_expert_gate.weight``
    router_bias: str | None = None                       # e.g. ``mlp.gate.e_score_correction_bias``
    always_write_shared_expert: bool = False             # GLM-4.5 builds a zero-width one when n_shared_experts=0
    dense_mlp: str = "mlp"                               # a dense layer's MLP (gate_proj, up_proj, down_proj)


@dataclass(frozen=True)
class Family:
    """One supported ``transformers`` MoE class: its names on disk and its config translation.

    ``read_config(hf, where)`` turns an HF ``config.json`` dict into ``ModelConfig`` fields and
    ``write_config(model)`` turns a ``ModelConfig`` back into HF config fields (without
    ``architectures``/``model_type``); both raise :class:`InteropError` naming what does not map.
    A family is one file in this folder and one entry in ``families.FAMILIES``.
    """

    architecture: str                                    # ``architectures[0]`` in config.json
    model_type: str
    naming: Naming
    read_config: Callable[[dict, str], dict]             # (hf config, where) -> ModelConfig fields
    write_config: Callable[[ModelConfig], dict]          # -> hf config fields (no architectures/model_type)
    summary: str = ""
    # ``transformers`` config fields of the tiny test model (``interop.hf.tiny``), on top of its shared sizes.
    tiny_config: dict = field(default_factory=dict, compare=False)


def refuse(where: str, what: str) -> InteropError:
    """The error for an HF setting (or a model feature) that does not map.

    Args:
        where: the file or class named first in the message.
        what: the setting, its value and why it cannot be represented.

    Returns:
        The :class:`InteropError` to raise.
    """
    return InteropError(f"{where}: {what}")


def get(hf: dict, key: str, where: str, default=None, required: bool = False):
    """An HF config value, with a default or a refusal when it is absent (or null).

    Args:
        hf: the ``config.json`` dict.
        key: the field.
        where: named in the refusal.
        default: returned when the field is absent and not required.
        required: refuse an absent field instead.

    Returns:
        The value, or ``default``.

    Raises:
        InteropError: the field is required and absent.
    """
    if key in hf and hf[key] is not None:
        return hf[key]
    if required:
        raise refuse(where, f"config.json lacks {key!r}")
    return default


def num_experts(hf: dict, where: str) -> int:
    """Routed experts: ``num_experts`` in older configs, ``num_local_experts`` as transformers v5 saves them.

    Args:
        hf: the ``config.json`` dict.
        where: named in the refusal.

    Returns:
        The number of routed experts.
    """
    return int(get(hf, "num_experts", where) or get(hf, "num_local_experts", where, required=True))


def rope_settings(hf: dict, where: str) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor); only plain RoPE (no scaling) maps onto MCore's RotaryEmbedding.

    Args:
        hf: the ``config.json`` dict.
        where: named in the refusal.

    Returns:
        ``(rope_theta, partial_rotary_factor)``.

    Raises:
        InteropError: a RoPE scaling (yarn, linear, ...) is set.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") \
        or "default"
    if rope_type != "default":
        raise refuse(where, f"RoPE type {rope_type!r} (rope scaling) is not supported; only plain RoPE maps "
                            "exactly onto Megatron-Core's rotary embedding")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return float(theta), float(partial)


def common_read(hf: dict, where: str) -> dict:
    """The fields every family shares, with the refusals that apply to all of them.

    Args:
        hf: the ``config.json`` dict.
        where: named in every refusal.

    Returns:
        ``ModelConfig`` fields (attention, norms, RoPE, vocabulary, sizes).
    """
    act = get(hf, "hidden_act", where, "silu")
    if act != "silu":
        raise refuse(where, f"hidden_act {act!r}: only SwiGLU (silu) experts are supported")
    if hf.get("use_sliding_window") or (hf.get("sliding_window") and hf.get("use_sliding_window", True)
                                        and hf.get("model_type") == "mixtral"):
        setting = f"sliding_window={hf.get('sliding_window')}"
        if hf.get("use_sliding_window"):
            setting = f"use_sliding_window={hf['use_sliding_window']} ({setting})"
        raise refuse(where, f"{setting}: sliding-window attention is not supported: Megatron-Core's local "
                            "attention here is full causal attention")
    if hf.get("attention_dropout"):
        raise refuse(where, "attention_dropout must be 0 for an exact conversion")
    heads = int(get(hf, "num_attention_heads", where, required=True))
    hidden = int(get(hf, "hidden_size", where, required=True))
    theta, partial = rope_settings(hf, where)
    if theta != int(theta):
        raise refuse(where, f"rope_theta {theta} is not an integer (model.rotary_base is an integer)")
    max_pos = int(get(hf, "max_position_embeddings", where, DEFAULT_IMPORT_SEQ_LENGTH))
    return dict(
        num_layers=int(get(hf, "num_hidden_layers", where, required=True)),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(get(hf, "num_key_value_heads", where, heads)),
        kv_channels=int(get(hf, "head_dim", where, hidden // heads)),
        layernorm_epsilon=float(get(hf, "rms_norm_eps", where, 1e-6)),
        normalization="RMSNorm",
        gated_linear_unit=True,
        add_bias_linear=False,
        vocab_size=int(get(hf, "vocab_size", where, required=True)),
        seq_length=min(max_pos, DEFAULT_IMPORT_SEQ_LENGTH),
        position_embedding_type="rope",
        rotary_base=int(theta),
        rotary_percent=partial,
        untie_embeddings_and_output_weights=not bool(hf.get("tie_word_embeddings", False)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def common_write(model: ModelConfig, where: str) -> dict:
    """The inverse of :func:`common_read`: the HF fields every family shares.

    Args:
        model: the model to describe.
        where: the class name, named in every refusal.

    Returns:
        HF config fields.

    Raises:
        InteropError: the model has a feature no supported class holds (not RMSNorm, not SwiGLU, ...).
    """
    if model.normalization != "RMSNorm":
        raise refuse(where, f"model.normalization={model.normalization}: the HF classes use RMSNorm")
    if not model.gated_linear_unit:
        raise refuse(where, "model.gated_linear_unit=false: the HF classes have SwiGLU experts")
    if model.add_bias_linear:
        raise refuse(where, "model.add_bias_linear=true: the HF MoE classes have no linear biases")
    return dict(
        num_hidden_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        head_dim=model.kv_channels,
        rms_norm_eps=model.layernorm_epsilon,
        hidden_act="silu",
        vocab_size=model.vocab_size,
        max_position_embeddings=model.seq_length,
        rope_parameters={"rope_theta": float(model.rotary_base), "rope_type": "default"},
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        attention_dropout=0.0,
        dtype="float32",
    )


def softmax_router_read(hf: dict, where: str, norm_topk_prob: bool) -> dict:
    """HF softmax routers: softmax over all experts, top-k, optionally renormalised over the k.

    Renormalised top-k of a softmax equals a softmax over the top-k logits, which is MCore's
    ``moe_router_pre_softmax=False``; without renormalisation it is ``pre_softmax=True``.

    Args:
        hf: the ``config.json`` dict.
        where: named in the refusal.
        norm_topk_prob: whether the class renormalises the top-k weights.

    Returns:
        The router's ``ModelConfig`` fields.
    """
    topk = int(get(hf, "num_experts_per_tok", where, required=True))
    if topk == 1 and norm_topk_prob:
        raise refuse(where, "top-1 routing with norm_topk_prob=true (weight always 1.0) has no Megatron-Core "
                            "equivalent (its top-1 softmax router must use pre-softmax)")
    return dict(moe_router_topk=topk, moe_router_score_function="softmax", moe_router_pre_softmax=not norm_topk_prob,
                moe_router_enable_expert_bias=False, moe_router_topk_scaling_factor=None,
                moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001) or 0.0))


def softmax_router_write(model: ModelConfig, where: str) -> dict:
    """The inverse of :func:`softmax_router_read`.

    Args:
        model: the model to describe.
        where: the class name, named in every refusal.

    Returns:
        HF router fields, ``norm_topk_prob`` included.
    """
    if model.moe_router_score_function != "softmax":
        raise refuse(where, f"model.moe_router_score_function={model.moe_router_score_function}: this class "
                            "has a softmax router")
    if model.moe_router_enable_expert_bias:
        raise refuse(where, "model.moe_router_enable_expert_bias=true: this class has no expert routing bias")
    if model.moe_router_topk_scaling_factor not in (None, 1.0):
        raise refuse(where, f"model.moe_router_topk_scaling_factor={model.moe_router_topk_scaling_factor}: "
                            "this class has no routing scaling factor")
    return {"num_experts_per_tok": model.moe_router_topk, "norm_topk_prob": not model.moe_router_pre_softmax,
            "router_aux_loss_coef": model.moe_aux_loss_coeff}


def require_absent(model: ModelConfig, where: str, *, shared: bool = False, qkv_bias: bool = False,
                   rotary_full: bool = True, mla: bool = False, grouped: bool = False) -> None:
    """Refuse ModelConfig features a class cannot hold.

    Args:
        model: the model to describe.
        where: the class name, named in the refusal.
        shared: the class has a shared expert.
        qkv_bias: the class has q/k/v biases.
        rotary_full: the class rotates the whole head (no partial RoPE).
        mla: the class has multi-latent attention (and no GQA attention).
        grouped: the class has grouped routing.

    Raises:
        InteropError: naming the first feature the class cannot hold.
    """
    if not shared and model.moe_shared_expert_intermediate_size:
        raise refuse(where, "model.moe_shared_expert_intermediate_size is set: this class has no shared expert")
    if not qkv_bias and model.add_qkv_bias:
        raise refuse(where, "model.add_qkv_bias=true: this class has no attention biases")
    if model.multi_latent_attention != mla:
        raise refuse(where, f"model.multi_latent_attention={str(model.multi_latent_attention).lower()}: this class "
                            f"{'has' if mla else 'has no'} multi-latent attention")
    if not grouped and model.moe_router_num_groups is not None:
        raise refuse(where, "model.moe_router_num_groups is set: this class has no grouped routing")
    if rotary_full and model.rotary_percent != 1.0:
        raise refuse(where, f"model.rotary_percent={model.rotary_percent}: this class rotates the whole head")


# ------------------------------------------------------------------------------------------------
# Dense layers and shared experts, as the families that have them spell them (GLM-4.5 and DeepSeek-V2/V3:
# ``first_k_dense_replace`` and ``n_shared_experts``; Qwen2/3-MoE: ``mlp_only_layers`` and
# ``decoder_sparse_step``). A dense layer's MLP is ``intermediate_size`` wide (``model.ffn_hidden_size``).


def with_dense_layers(dense: list[int], num_layers: int, intermediate_size: int | None, where: str) -> dict:
    """``ModelConfig`` fields of a stack whose layers ``dense`` are dense and the rest MoE.

    Args:
        dense: the dense layers' indices.
        num_layers: the layers.
        intermediate_size: the dense MLP width (``intermediate_size``); required when any layer is dense.
        where: named in the refusal.

    Returns:
        ``moe_layer_freq`` (1 when every layer is MoE, else the 0/1 list) and ``ffn_hidden_size``.
    """
    if not dense:
        return {"moe_layer_freq": 1, "ffn_hidden_size": None}
    if len(dense) >= num_layers:
        raise refuse(where, f"every layer is dense (dense layers {sorted(dense)}): not an MoE model")
    if not intermediate_size:
        raise refuse(where, "config.json lacks 'intermediate_size', the dense layers' MLP width")
    return {"moe_layer_freq": tuple(0 if i in dense else 1 for i in range(num_layers)),
            "ffn_hidden_size": int(intermediate_size)}


def dense_layers(model: ModelConfig) -> list[int]:
    """The dense layers of ``model`` (``model.moe_layer_freq``)."""
    return [i for i, moe in enumerate(moe_layer_pattern(model)) if not moe]


def dense_width(model: ModelConfig) -> int:
    """HF ``intermediate_size``: the dense layers' MLP width (the expert width when there are none)."""
    return model.ffn_hidden_size or model.moe_ffn_hidden_size


def first_k_dense_read(hf: dict, where: str) -> dict:
    """``first_k_dense_replace`` (GLM-4.5, DeepSeek-V2/V3): the first k layers dense, the rest MoE.

    Args:
        hf: the ``config.json`` dict.
        where: named in the refusal.

    Returns:
        ``moe_layer_freq`` and ``ffn_hidden_size`` (:func:`with_dense_layers`).
    """
    k = int(hf.get("first_k_dense_replace") or 0)
    layers = int(get(hf, "num_hidden_layers", where, required=True))
    if int(hf.get("moe_layer_freq", 1) or 1) != 1:  # DeepSeek-V2/V3: MoE every moe_layer_freq layers after k
        raise refuse(where, f"moe_layer_freq={hf['moe_layer_freq']}: only 1 (every layer after the first "
                            "first_k_dense_replace an MoE layer) is supported")
    return with_dense_layers(list(range(k)), layers, hf.get("intermediate_size"), where)


def first_k_dense_write(model: ModelConfig, where: str) -> dict:
    """The inverse of :func:`first_k_dense_read`: refuses a pattern that is not k dense layers, then MoE."""
    dense = dense_layers(model)
    if dense != list(range(len(dense))):
        raise refuse(where, f"model.moe_layer_freq: dense layers {dense} are not the first layers; this class "
                            "has only first_k_dense_replace")
    return {"first_k_dense_replace": len(dense), "intermediate_size": dense_width(model)}


def n_shared_experts_read(hf: dict, where: str, expert_width: int) -> dict:
    """``n_shared_experts`` (GLM-4.5, DeepSeek): one ungated shared MLP ``n x moe_intermediate_size`` wide."""
    n = int(hf.get("n_shared_experts") or 0)
    return {"moe_shared_expert_intermediate_size": n * expert_width or None, "moe_shared_expert_gate": False}


def n_shared_experts_write(model: ModelConfig, where: str) -> dict:
    """The inverse of :func:`n_shared_experts_read`: the width must be a whole number of experts, ungated."""
    S, F = model.moe_shared_expert_intermediate_size or 0, model.moe_ffn_hidden_size
    if S % F:
        raise refuse(where, f"model.moe_shared_expert_intermediate_size={S} is not a multiple of "
                            f"model.moe_ffn_hidden_size={F} (this class has n_shared_experts of that width)")
    if model.moe_shared_expert_gate:
        raise refuse(where, "model.moe_shared_expert_gate=true: this class's shared experts have no gate")
    return {"n_shared_experts": S // F}


def sparse_step_read(hf: dict, where: str) -> dict:
    """Qwen2/3-MoE: layer i is MoE unless in ``mlp_only_layers``, and only if ``(i + 1) % decoder_sparse_step == 0``."""
    layers = int(get(hf, "num_hidden_layers", where, required=True))
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    only = {int(i) for i in hf.get("mlp_only_layers") or []}
    dense = [i for i in range(layers) if i in only or (i + 1) % step]
    return with_dense_layers(dense, layers, hf.get("intermediate_size"), where)


def sparse_step_write(model: ModelConfig) -> dict:
    """The inverse of :func:`sparse_step_read` (``decoder_sparse_step`` 1, the dense layers listed)."""
    return {"decoder_sparse_step": 1, "mlp_only_layers": dense_layers(model), "intermediate_size": dense_width(model)}


def refuse_dense_layers(hf: dict, model: ModelConfig | None, where: str) -> None:
    """For a class with no dense layers: refuse the HF fields that would make some (read) or a model with some
    (write), naming the field."""
    if hf.get("mlp_only_layers"):
        raise refuse(where, f"mlp_only_layers={hf['mlp_only_layers']}: this class has no dense layers")
    if int(hf.get("decoder_sparse_step", 1) or 1) != 1:
        raise refuse(where, f"decoder_sparse_step={hf['decoder_sparse_step']}: this class has no dense layers")
    if model is not None and dense_layers(model):
        raise refuse(where, f"model.moe_layer_freq: dense layers {dense_layers(model)}; this class has none")


LAYER_TENSOR_RE = re.compile(r"model\.layers\.(\d+)\.")


def check_layers_beyond_the_stack(hf: dict, tensor_names, where: str, drop: bool) -> list[int]:
    """Tensors of layers past ``num_hidden_layers``: the multi-token-prediction layers GLM-4.5 and
    DeepSeek-V3 checkpoints store there (``num_nextn_predict_layers``), which no supported class runs and
    which this model cannot represent. Refused unless ``drop`` (``import-hf --drop-mtp``): importing without
    them would silently leave weights behind. A config that names such layers while the files hold none
    (``save_pretrained`` never writes them) loses nothing and is accepted.

    Args:
        hf: the ``config.json`` dict.
        tensor_names: every tensor name in the safetensors files.
        where: named in the refusal.
        drop: import without them.

    Returns:
        The layer indices left out (empty when none are stored).
    """
    num_layers = int(hf.get("num_hidden_layers") or 0)
    extra = sorted({int(m.group(1)) for n in tensor_names if (m := LAYER_TENSOR_RE.match(n))
                    and int(m.group(1)) >= num_layers})
    if extra and not drop:
        raise refuse(where, f"num_nextn_predict_layers={hf.get('num_nextn_predict_layers')}: the files hold layer(s) "
                            f"{extra} past num_hidden_layers {num_layers} (multi-token-prediction layers, which this "
                            "model cannot represent); import-hf --drop-mtp imports without them, as transformers' "
                            "forward runs without them")
    return extra
