"""The plain-tensor growth oracle: grow a whole single-process state dict in memory.

Assumed input: ``GPTModel.state_dict()`` of a model built by ``megatron_grow.models`` with
the *local* spec in one process (no TP/PP/EP), so every tensor is whole and keys look like

- ``decoder.layers.<i>.<anything>``: per layer (norms, attention, router, shared experts, ...)
- ``decoder.layers.<i>.mlp.router.weight`` ``[E, H]``, ``...mlp.router.expert_bias`` ``[E]``
- ``decoder.layers.<i>.mlp.experts.local_experts.<e>.linear_fc1.weight`` ``[2F, H]``
  (SequentialMLP; gate rows then up rows) and ``...linear_fc2.weight`` ``[H, F]``
- ``embedding.*``, ``decoder.final_layernorm.*``, ``output_layer.*``: not per layer
- ``*._extra_state``: opaque values, moved with their layer/expert untouched.

Every per-layer entry moves with its layer (``plan.layer_source``); the router weight, the
expert bias and the routed experts also follow ``plan.expert_source`` (per target layer) and the operators'
transforms; everything else is copied (or zeroed where an operator says so). The
tensors themselves are produced by the same functions the sharded loader calls
(``grow_expert_tensor``, ``grow_router``, ``grow_expert_bias``), so this is the reference
the sharded path is compared against, not a second implementation of the noise.

Why it ships in the package although no command imports it: it is the library's single-process
reference for the sharded growth (the design conventions, principle 5: every distributed behaviour has
one, in ``growth/``), and both the tests (``tests/distributed/bodies.py: oracle_vs_sharded``, the
unit and GPU tests) and the benchmarks' naive baseline (``benchmarks/grow_bench.py``) grow with it;
``tests/`` is not importable from an installed package. Its independent counterpart, written from
docs/growth.md without importing any operator code, is ``tests/distributed/oracle.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from megatron_grow.checkpoint import keys
from megatron_grow.errors import GrowthError
from megatron_grow.growth.noise import FC1_KEY, FC2_KEY, Moments, tensor_moments
from megatron_grow.growth.plan import GrowthPlan
from megatron_grow.growth.transforms import (
    expert_noise_std,
    grow_expert_bias,
    grow_expert_tensor,
    grow_router,
    zeroed,
)

_LOGICAL = {keys.FC1_NAME: FC1_KEY, keys.FC2_NAME: FC2_KEY}


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _split_layers(source_sd: dict[str, Any]) -> tuple[dict[int, dict[str, Any]], list[str], list[str]]:
    """Per-layer entries by layer index, and the non-layer keys before and after the layers."""
    layers: dict[int, dict[str, Any]] = {}
    head, tail = [], []
    for key, value in source_sd.items():
        m = keys.MODULE_LAYER_RE.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif layers:
            tail.append(key)
        else:
            head.append(key)
    return layers, head, tail


def _check_source(layers: dict[int, dict[str, Any]], plan: GrowthPlan) -> None:
    want = plan.source.num_layers
    if sorted(layers) != list(range(want)):
        raise GrowthError(f"source state dict has layers {sorted(layers)}, the plan expects {want} layers "
                          f"(single-process, no pipeline parallelism)")
    for i, entries in layers.items():
        experts = set()
        for suffix in entries:
            if suffix.startswith("mlp.experts."):
                m = keys.MODULE_LOCAL_EXPERT_RE.match(suffix)
                if not m:
                    raise GrowthError(f"decoder.layers.{i}.{suffix}: only the local spec's SequentialMLP "
                                      f"(mlp.experts.local_experts.<e>.*) is supported by the reference")
                experts.add(int(m.group(1)))
        if experts and sorted(experts) != list(range(plan.source.num_moe_experts)):
            raise GrowthError(f"decoder.layers.{i}: experts {sorted(experts)} do not match the plan's "
                              f"{plan.source.num_moe_experts} source experts")


def _expert_moments(entries: dict[str, Any], num_experts: int) -> dict[str, list[Moments]]:
    """Per logical key, the moments of each source expert's tensor in expert order."""
    out = {}
    for suffix, logical in _LOGICAL.items():
        key0 = f"mlp.experts.local_experts.0.{suffix}"
        if key0 in entries:
            out[logical] = [tensor_moments(entries[f"mlp.experts.local_experts.{e}.{suffix}"])
                            for e in range(num_experts)]
    return out


def grow_state_dict(source_sd: dict[str, Any], plan: GrowthPlan) -> dict[str, Any]:
    """The grown model's plain state dict (loadable into a model built with ``plan.target``).

    Args:
        source_sd: ``GPTModel.state_dict()`` of the source (local spec, one process).
        plan: the growth plan (``plan.make_growth_plan``).

    Returns:
        The grown state dict, every tensor a new one.

    Raises:
        GrowthError: the state dict does not match the plan's source (layers, experts, spec).
    """
    layers, head, tail = _split_layers(source_sd)
    _check_source(layers, plan)
    out: dict[str, Any] = {key: _copy(source_sd[key]) for key in head}
    moments = {}
    for j, s in enumerate(plan.layer_source):
        entries = layers[s]
        if s not in moments:
            moments[s] = _expert_moments(entries, plan.source.num_moe_experts)
        expert_suffixes: dict[int, list[str]] = {}
        for suffix, value in entries.items():
            m = keys.MODULE_LOCAL_EXPERT_RE.match(suffix)
            if m:
                if int(m.group(1)) == 0:  # one template per expert-relative name
                    expert_suffixes.setdefault(0, []).append(m.group(2))
                continue
            key = keys.module_layer_key(j, suffix)
            if suffix == keys.ROUTER_SUFFIX:
                out[key] = grow_router(plan, j, value)
            elif suffix == keys.EXPERT_BIAS_SUFFIX:
                out[key] = grow_expert_bias(plan, j, value)
            elif isinstance(value, torch.Tensor) and zeroed(plan, j, suffix):
                out[key] = torch.zeros_like(value)
            else:
                out[key] = _copy(value)
        for e_t, e_s in enumerate(plan.expert_source[j]):
            for rest in expert_suffixes.get(0, []):
                value = entries[f"mlp.experts.local_experts.{e_s}.{rest}"]
                key = keys.module_expert_key(j, e_t, rest)
                logical = _LOGICAL.get(rest)
                if logical is not None:
                    std = expert_noise_std(plan, moments[s][logical], e_s)
                    out[key] = grow_expert_tensor(plan, logical, j, e_t, value, std)
                elif isinstance(value, torch.Tensor) and zeroed(plan, j, f"mlp.experts.{rest}"):
                    out[key] = torch.zeros_like(value)  # fc2 bias of a new depth copy
                else:
                    out[key] = _copy(value)  # expert linear biases and _extra_state: exact copies
    for key in tail:
        out[key] = _copy(source_sd[key])
    return out
