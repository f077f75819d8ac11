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

# Stacked storage keys.
QKV = LAYER_PREFIX + QKV_SUFFIX
PROJ = LAYER_PREFIX + PROJ_SUFFIX
ROUTER = LAYER_PREFIX + ROUTER_SUFFIX
EXPERT_BIAS = LAYER_PREFIX + EXPERT_BIAS_SUFFIX
EXPERT_FC1 = LAYER_PREFIX + "mlp.experts.experts." + FC1_NAME
EXPERT_FC2 = LAYER_PREFIX + "mlp.experts.experts." + FC2_NAME

# Module keys.
MODULE_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
MODULE_LOCAL_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def module_layer_key(layer_idx: int, suffix: str) -> str:
    """``decoder.layers.<layer_idx>.<suffix>`` (a module state-dict key)."""
    return f"{LAYER_PREFIX}{layer_idx}.{suffix}"


def module_expert_key(layer_idx: int, expert_idx: int, name: str) -> str:
    """The module key of local expert ``expert_idx``'s tensor ``name`` in layer ``layer_idx``."""
    return module_layer_key(layer_idx, f"mlp.experts.local_experts.{expert_idx}.{name}")


def is_layer_key(key: str) -> bool:
    return key.startswith(LAYER_PREFIX)


def is_routed_expert_key(key: str) -> bool:
    return ROUTED_EXPERTS_MARKER in key and ".shared_experts." not in key


# Optimizer state in model space (MCore's distributed optimizer ``fully_reshardable`` format and the
# non-distributed optimizers): one tensor per parameter and state, with the parameter's global shape,
# stored as ``optimizer.state.<state>.<storage key of the parameter>``. ``param`` is the fp32 main copy.
OPTIMIZER_STATE_PREFIX = "optimizer.state."
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
MAIN_PARAM_STATE = "param"


def optimizer_state_key(state: str, model_key: str) -> str:
    """``optimizer.state.<state>.<model_key>``."""
    return f"{OPTIMIZER_STATE_PREFIX}{state}.{model_key}"


def is_model_space_optimizer_key(key: str) -> bool:
    return any(key.startswith(f"{OPTIMIZER_STATE_PREFIX}{state}.") for state in ADAM_MOMENTS)
