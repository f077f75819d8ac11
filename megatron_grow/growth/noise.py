"""Width-growth noise: deterministic, and independent of the parallel layout.

What this module assumes:

- Tensors are named by *logical keys* that do not depend on the checkpoint layout
  (``EXPERT_KEYS`` per expert, ``ROUTER_KEY``/``EXPERT_BIAS_KEY`` per layer):

  ===========================  ===============  ===========================================
  logical key                  tensor           notes
  ===========================  ===============  ===========================================
  ``experts.linear_fc1``       ``[2F, H]``      one expert; rows ``[0:F]`` gate, ``[F:2F]`` up
  ``experts.linear_fc2``       ``[H, F]``       one expert
  ``router.weight``            ``[E, H]``       one layer
  ``router.expert_bias``       ``[E]``          one layer
  ===========================  ===============  ===========================================

- Every random draw comes from its own CPU ``torch.Generator`` seeded by a SHA-256 of
  ``(seed, logical key, layer, expert, stream)`` (never Python's salted ``hash()``, never the
  rank), over the *full* per-expert (or per-row) shape: the seed is the first 8 bytes, little
  endian, of ``SHA-256("megatron_grow.noise|<seed>|<key>|<layer>|<expert>|<stream>")`` masked to
  63 bits (docs/growth.md, "Exact definition of the operators", is the contract). A caller that holds only a TP/EP
  slice generates the full noise and slices it, so the grown tensors are bit-identical under
  any TP/EP/PP layout. CPU ``randn`` with an explicit generator is sequential, hence also
  independent of the thread count.
- The std that scales the noise is passed in by the caller (``grow_expert_tensor`` never
  computes it), because a sharded caller sees only slices: it computes moments per slice
  (``tensor_moments``), combines them (``combine_moments``) and rounds with
  ``canonical_std``. See ``canonical_std`` for why the rounding exists.

Legend for shape suffixes: E experts, H model dim, F expert FFN dim.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import torch

from megatron_grow.config.schema import NewExperts, NoiseGranularity, NoiseKind
from megatron_grow.growth.plan import GrowthPlan

FC1_KEY = "experts.linear_fc1"
FC2_KEY = "experts.linear_fc2"
ROUTER_KEY = "router.weight"
EXPERT_BIAS_KEY = "router.expert_bias"
EXPERT_KEYS = (FC1_KEY, FC2_KEY)

_MASK_63 = (1 << 63) - 1


# ----------------------------------------------------------------------------------------------
# Generators


def noise_seed(seed: int, logical_key: str, layer: int, expert: int, stream: int = 0) -> int:
    """A stable 63-bit seed for one draw: first 8 bytes of SHA-256 of the tuple, masked."""
    text = f"megatron_grow.noise|{int(seed)}|{logical_key}|{int(layer)}|{int(expert)}|{int(stream)}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & _MASK_63


def noise_generator(seed: int, logical_key: str, layer: int, expert: int, *, stream: int = 0) -> torch.Generator:
    """A fresh CPU generator for ``(seed, logical_key, layer, expert[, stream])``.

    ``stream`` separates several draws for the same tensor (antithetic noise draws one per
    copy-group member).
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(noise_seed(seed, logical_key, layer, expert, stream))
    return g


# ----------------------------------------------------------------------------------------------
# Moments and std


class Moments(NamedTuple):
    """Count, mean and sum of squared deviations (M2), in float64."""

    n: int
    mean: float
    m2: float


def tensor_moments(t: torch.Tensor) -> Moments:
    """Moments of all elements of ``t``, computed in float64."""
    n = t.numel()
    if n == 0:
        return Moments(0, 0.0, 0.0)
    t64 = t.detach().to(device="cpu", dtype=torch.float64)
    mean = t64.mean().item()
    return Moments(n, mean, ((t64 - mean) ** 2).sum().item())


def combine_moments(parts: Sequence[Moments]) -> Moments:
    """Chan et al.'s parallel combination, folded left in the given order."""
    n, mean, m2 = 0, 0.0, 0.0
    for p in parts:
        pn, pmean, pm2 = int(p[0]), float(p[1]), float(p[2])
        if pn == 0:
            continue
        total = n + pn
        delta = pmean - mean
        mean = mean + delta * pn / total
        m2 = m2 + pm2 + delta * delta * n * pn / total
        n = total
    return Moments(n, mean, m2)


def std_from_moments(moments: Moments) -> float:
    """Unbiased std (like ``torch.std``); 0.0 for fewer than two elements (no noise, not NaN)."""
    n, _, m2 = moments
    if n < 2:
        return 0.0
    return math.sqrt(max(m2, 0.0) / (n - 1))


def canonical_std(x: float) -> float:
    """Round a std to 6 significant digits.

    The same data summed in a different order (per-slice moments combined across TP ranks,
    another thread count, another device) gives a float64 std that can differ in its last
    bits. Used as a noise scale, that would change every noised bit of the grown model. After
    rounding to 6 significant digits those stds are identical, except in the astronomically
    rare case (relative differences ~1e-15 against a 1e-6 grid) where a value straddles a
    rounding boundary. 6 digits is far finer than anything alpha means statistically.
    """
    x = float(x)
    if x == 0.0 or not math.isfinite(x):
        return x
    return float(f"{x:.6g}")  # Python's float formatting is correctly rounded on every platform


def tensor_std(t: torch.Tensor) -> float:
    """``canonical_std`` of the unbiased std of all elements of ``t``."""
    return canonical_std(std_from_moments(tensor_moments(t)))


def expert_noise_std(plan: GrowthPlan, moments_by_expert: Sequence[Moments], source_expert: int) -> float:
    """The std that scales the noise of ``source_expert``'s copies, for one logical key and layer.

    ``moments_by_expert[e]`` are the moments of source expert ``e``'s tensor (all source
    experts of the layer, in expert order). per_expert: that expert's std; per_layer: the std
    of all experts' elements, combined in expert order (the paper's fused-GEMM runs).
    """
    w = plan.growth.width
    if w is not None and w.noise_granularity == NoiseGranularity.PER_LAYER:
        return canonical_std(std_from_moments(combine_moments(moments_by_expert)))
    return canonical_std(std_from_moments(moments_by_expert[source_expert]))


# ----------------------------------------------------------------------------------------------
# Which tensors identity_init zeroes

_IDENTITY_ZEROED = (
    re.compile(r"(^|\.)self_attention\.linear_proj\.(weight|bias)$"),
    # local spec: experts.local_experts.<e>.linear_fc2; TE grouped: experts.linear_fc2.weight<e>;
    # dist-ckpt storage: experts.experts.linear_fc2
    re.compile(r"(^|\.)experts\.(local_experts\.\d+\.|experts\.)?linear_fc2\.(weight|bias)\d*$"),
    re.compile(r"(^|\.)shared_experts\.linear_fc2\.(weight|bias)$"),
)


def zeroed_by_identity_init(name: str) -> bool:
    """True for the tensors a new depth copy starts at zero with ``identity_init``.

    ``name`` is a state-dict key (full or relative to the layer) or a logical key. Zeroed:
    attention ``linear_proj``, routed-expert ``linear_fc2`` and shared-expert ``linear_fc2``
    (weights and biases), so each new block starts as the identity on the residual stream.
    """
    if name == FC2_KEY:
        return True
    return any(p.search(name) for p in _IDENTITY_ZEROED)


def identity_zeroed(plan: GrowthPlan, target_layer: int, name: str) -> bool:
    """Whether ``name`` in ``target_layer`` of the grown model is zeroed by ``identity_init``."""
    d = plan.growth.depth
    return bool(d is not None and d.identity_init and plan.layer_is_new_copy[target_layer]
                and zeroed_by_identity_init(name))


# ----------------------------------------------------------------------------------------------
# Grow tensors


def _region(region: tuple | None, ndim: int) -> tuple:
    if region is None:
        return (slice(None),) * ndim
    return tuple(region)


def _expert_noise_fp32(plan: GrowthPlan, logical_key: str, target_layer: int, target_expert: int,
                       full_shape: tuple[int, ...], std: float) -> torch.Tensor | None:
    """Full-shape fp32 noise *added* to the source for this target expert, or None for none."""
    w = plan.growth.width
    copy_idx = plan.expert_copy_index[target_expert]
    scale = w.alpha * std
    if w.noise == NoiseKind.NONE or scale == 0.0:
        return None
    layer = plan.noise_layer(target_layer)
    seed = plan.growth.seed
    if w.noise == NoiseKind.GAUSSIAN:
        if copy_idx == 0:
            return None  # originals stay exact
        g = noise_generator(seed, logical_key, layer, target_expert)
        return torch.randn(full_shape, generator=g, dtype=torch.float32) * scale
    # antithetic: zero-sum fc2 noise within the copy group; fc1 exact keeps every member's
    # hidden activation equal to the source's, so the group's (equal-weight) output is exact.
    if logical_key != FC2_KEY:
        return None
    src_expert = plan.expert_source[target_expert]
    m = w.factor

    def eps(c: int) -> torch.Tensor:
        g = noise_generator(seed, logical_key, layer, src_expert, stream=c)
        return torch.randn(full_shape, generator=g, dtype=torch.float32) * scale

    if copy_idx < m - 1:
        return eps(copy_idx)
    total = eps(0)
    for c in range(1, m - 1):
        total = total + eps(c)
    return -total


def grow_expert_tensor(plan: GrowthPlan, logical_key: str, target_layer: int, target_expert: int,
                       source_expert_tensor: torch.Tensor, std: float, *,
                       full_shape: Sequence[int] | None = None,
                       region: tuple | None = None) -> torch.Tensor:
    """The target tensor of one expert, from its source expert's tensor (same dtype).

    ``source_expert_tensor`` is the full per-expert tensor of ``plan.expert_source[target_expert]``
    in source layer ``plan.layer_source[target_layer]`` -- or only ``region`` of it (a tuple of
    slices into the full tensor, whose shape is then given as ``full_shape``): the result is
    then exactly ``region`` of the full result, because the noise is always generated over the
    full shape. ``std`` is the (canonical) std of the source tensor, per expert or per layer
    (``expert_noise_std``); it is not computed here so that a sharded caller can supply it.

    Originals are exact under ``gaussian``/``none``; ``antithetic`` also perturbs the
    original's fc2 (zero-sum group); ``new_experts: random`` replaces copies with
    N(0, init_method_std^2). Noise is added in fp32, then cast. ``identity_init`` zeroing of
    fc2 in a new depth copy is applied last.
    """
    if logical_key not in EXPERT_KEYS:
        raise ValueError(f"not a per-expert logical key: {logical_key!r} (expected one of {EXPERT_KEYS})")
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be finite and >= 0, got {std}")
    src = source_expert_tensor
    full_shape = tuple(src.shape) if full_shape is None else tuple(int(s) for s in full_shape)
    reg = _region(region, len(full_shape))
    if identity_zeroed(plan, target_layer, logical_key):
        return torch.zeros_like(src)
    w = plan.growth.width
    if w is None:
        return src.clone()
    if w.new_experts == NewExperts.RANDOM:
        if plan.expert_copy_index[target_expert] == 0:
            return src.clone()  # the ablation keeps the originals exact, whatever `noise` says
        g = noise_generator(plan.growth.seed, logical_key, plan.noise_layer(target_layer), target_expert)
        fresh = torch.randn(full_shape, generator=g, dtype=torch.float32) * plan.source.init_method_std
        return fresh[reg].to(dtype=src.dtype, device=src.device).clone()
    noise = _expert_noise_fp32(plan, logical_key, target_layer, target_expert, full_shape, std)
    if noise is None:
        return src.clone()
    noise = noise[reg].to(src.device)
    if noise.shape != src.shape:
        raise ValueError(f"{logical_key}: source slice shape {tuple(src.shape)} does not match region "
                         f"{reg} of full shape {full_shape}")
    return (src.to(torch.float32) + noise).to(src.dtype)


def _row_noise_fp32(plan: GrowthPlan, logical_key: str, target_layer: int, target_expert: int,
                    row_shape: tuple[int, ...], scale: float) -> torch.Tensor:
    g = noise_generator(plan.growth.seed, logical_key, plan.noise_layer(target_layer), target_expert)
    return torch.randn(row_shape, generator=g, dtype=torch.float32) * scale


def grow_router(plan: GrowthPlan, target_layer: int, source_router_EH: torch.Tensor) -> torch.Tensor:
    """Router weight ``[E_src, H] -> [E_tgt, H]``: rows follow ``plan.expert_source``.

    gaussian: copy rows get N(0, (alpha * canonical_std(std of the whole source router))^2),
    one generator per (noise layer, target expert); antithetic/none: exact copies;
    new_experts random: copy rows N(0, init_method_std^2).
    """
    w = plan.growth.width
    if w is None:
        return source_router_EH.clone()
    index = torch.tensor(plan.expert_source, dtype=torch.long, device=source_router_EH.device)
    out_EH = source_router_EH.index_select(0, index).clone()
    row_shape = tuple(source_router_EH.shape[1:])
    if w.new_experts == NewExperts.RANDOM:
        scale, add = plan.source.init_method_std, False
    elif w.noise == NoiseKind.GAUSSIAN:
        scale, add = w.alpha * tensor_std(source_router_EH), True
        if scale == 0.0:
            return out_EH
    else:
        return out_EH
    for e, c in enumerate(plan.expert_copy_index):
        if c == 0:
            continue
        row = _row_noise_fp32(plan, ROUTER_KEY, target_layer, e, row_shape, scale).to(out_EH.device)
        out_EH[e] = (out_EH[e].to(torch.float32) + row if add else row).to(out_EH.dtype)
    return out_EH


def grow_expert_bias(plan: GrowthPlan, target_layer: int, source_bias_E: torch.Tensor) -> torch.Tensor:
    """Router ``expert_bias`` ``[E_src] -> [E_tgt]``.

    zero_expert_bias: all zeros; new_experts random: copies 0; gaussian: copies get
    N(0, (alpha * canonical_std(std of the source bias vector))^2) (no noise while the bias is
    constant, e.g. freshly initialised); antithetic/none: exact copies.
    """
    w = plan.growth.width
    if w is None:
        return source_bias_E.clone()
    index = torch.tensor(plan.expert_source, dtype=torch.long, device=source_bias_E.device)
    out_E = source_bias_E.index_select(0, index).clone()
    if w.zero_expert_bias:
        return torch.zeros_like(out_E)
    if w.new_experts == NewExperts.RANDOM:
        for e, c in enumerate(plan.expert_copy_index):
            if c > 0:
                out_E[e] = 0
        return out_E
    if w.noise != NoiseKind.GAUSSIAN:
        return out_E
    scale = w.alpha * tensor_std(source_bias_E)
    if scale == 0.0:
        return out_E
    for e, c in enumerate(plan.expert_copy_index):
        if c > 0:
            eps = _row_noise_fp32(plan, EXPERT_BIAS_KEY, target_layer, e, (), scale).to(out_E.device)
            out_E[e] = (out_E[e].to(torch.float32) + eps).to(out_E.dtype)
    return out_E
