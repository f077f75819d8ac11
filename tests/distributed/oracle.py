"""The growth operators written from their definitions, independently of ``megatron_grow.growth``.

Nothing here imports the operator code (``growth.mapping``, ``growth.noise``, ``growth.plan``,
``growth.reference``, ``growth.retarget``): the index maps and the noise formula are spelled out
below from the definitions in docs/growth.md ("Exact definition of the operators") and the paper
notes, so a test comparing the sharded growth with :func:`expected_grown` can catch a bug in the
operators themselves, not only in the sharded plumbing.

Input and output are *plain* checkpoint tensors keyed by storage key, as
``dist_checkpointing.load_plain_tensors`` returns them: per-layer tensors stacked ``[L, ...]``,
routed-expert tensors ``[L, E, ...]``, router ``[L, E, H]``, expert bias ``[L, E]``.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch

# The logical tensor names that key the noise (docs/growth.md).
FC1, FC2, ROUTER, BIAS = "experts.linear_fc1", "experts.linear_fc2", "router.weight", "router.expert_bias"


# ------------------------------------------------------------------------------------------------
# Index maps


def depth_sources(L: int, mode: str, k: int, first: int = 0, last: int = 0) -> list[int]:
    """Source layer of every target layer.

    interposition: each layer in [first, L-last) repeated k times in place, the others once
    (without ignores target j reads j // k); stack: the block repeated k times (j % L without
    ignores), the first `first` layers only in the bottom copy and the last `last` only in the top.
    """
    if mode == "interposition":
        return [i for i in range(L) for _ in range(k if first <= i < L - last else 1)]
    assert mode == "stack"
    bottom = list(range(0, L - last))
    middle = [i for _ in range(k - 2) for i in range(first, L - last)]
    top = list(range(first, L))
    return bottom + middle + top


def is_new_depth_copy(sources: list[int]) -> list[bool]:
    """True for every occurrence of a source layer but its first (what identity_init zeroes)."""
    return [s in sources[:j] for j, s in enumerate(sources)]


def insert_sources(L: int, every, after) -> tuple[list[int], list[bool]]:
    """Depth by insertion (LLaMA Pro): (source layer, is an inserted block) of every target layer.

    The insertion points are source layers k-1, 2k-1, ... for ``every: k``, else the ``after`` list;
    walking the source layers in order, layer p is followed by one new block per time p is a point,
    each a copy of p (the preceding block).
    """
    points = list(range(every - 1, L, every)) if every else list(after)
    src, new = [], []
    for p in range(L):
        src += [p] * (1 + points.count(p))
        new += [False] + [True] * points.count(p)
    return src, new


def width_sources(E: int, m: int, layout: str) -> tuple[list[int], list[int]]:
    """(source expert, copy index) of every target expert; copy index 0 is the original.

    append: [e0..e(E-1), e0'..e(E-1)', ...] (target e reads e % E, copy e // E);
    interleave: [e0, e0', e1, e1', ...] (target e reads e // m, copy e % m).
    """
    n = E * m
    if layout == "append":
        return [e % E for e in range(n)], [e // E for e in range(n)]
    assert layout == "interleave"
    return [e // m for e in range(n)], [e % m for e in range(n)]


def upcycle_sources(E: int, u, layer: int) -> tuple[list[int], list[int]]:
    """(source expert, copy index) of every target expert of expert upcycling in a target layer that
    reads source layer ``layer`` (docs/growth.md, "Upcycle allocation (per layer)").

    Copies per expert by largest remainder within the layer: n = E' - E; utility u_e = the recorded
    shares of source layer ``layer`` (a single flat row stands for every layer), or all 1 for
    uniform; all 0 counts as uniform; quota q_e = n u_e / sum(u) in exact rationals; each gets
    floor(q_e), the rest one each by descending q_e - floor(q_e), lower index first. append: the E
    originals, then expert 0's copies, expert 1's, ...; interleave: each expert then its copies.
    """
    from fractions import Fraction

    n = u.num_experts - E
    shares = u.utility_shares
    if u.allocation == "utility":
        row = shares[layer] if isinstance(shares[0], (list, tuple)) else shares
        util = [Fraction(x) for x in row]
    else:
        util = [Fraction(1)] * E
    if sum(util) == 0:
        util = [Fraction(1)] * E
    q = [n * x / sum(util) for x in util]
    c = [math.floor(x) for x in q]
    for e in sorted(range(E), key=lambda e: (c[e] - q[e], e))[:n - sum(c)]:
        c[e] += 1
    if u.expert_layout == "append":
        return (list(range(E)) + [e for e in range(E) for _ in range(c[e])],
                [0] * E + [i for e in range(E) for i in range(1, c[e] + 1)])
    return [e for e in range(E) for _ in range(c[e] + 1)], [i for e in range(E) for i in range(c[e] + 1)]


# ------------------------------------------------------------------------------------------------
# Noise


def draw(seed: int, name: str, layer: int, expert: int, shape: tuple, stream: int = 0) -> torch.Tensor:
    """N(0, 1) fp32 of ``shape`` from the documented keyed generator.

    The generator is a CPU ``torch.Generator`` seeded with the first 8 bytes (little endian) of
    SHA-256("megatron_grow.noise|<seed>|<name>|<layer>|<expert>|<stream>") masked to 63 bits.
    """
    text = f"megatron_grow.noise|{seed}|{name}|{layer}|{expert}|{stream}"
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(value), dtype=torch.float32)


def std6(t: torch.Tensor) -> float:
    """Unbiased std of all elements in float64, rounded to 6 significant digits (0 for < 2 elements)."""
    if t.numel() < 2:
        return 0.0
    s = t.double().std().item()
    return float(f"{s:.6g}") if s else 0.0


# ------------------------------------------------------------------------------------------------
# The grown checkpoint


def _is_routed_expert(key: str, name: str) -> bool:
    return ".mlp.experts.experts." in key and key.endswith(name)


def _zeroed_by_identity_init(key: str) -> bool:
    # the output projection of each residual branch: attention, routed and shared experts, a dense MLP
    return (key.endswith(("self_attention.linear_proj.weight", "self_attention.linear_proj.bias"))
            or _is_routed_expert(key, "linear_fc2.weight") or _is_routed_expert(key, "linear_fc2.bias")
            or key.endswith(("shared_experts.linear_fc2.weight", "shared_experts.linear_fc2.bias"))
            or key.endswith((".mlp.linear_fc2.weight", ".mlp.linear_fc2.bias")))


def _layer_plan(L: int, growth):
    """(source layer, zeroed by identity init, layer that keys the noise) of every final layer."""
    d, w, u, ins = growth.depth, growth.width, growth.upcycle, growth.insert
    order = list(growth.order) or [op for op, on in (("depth", d), ("width", w), ("upcycle", u), ("insert", ins))
                                   if on]
    # Each layer operator's map (output -> input) and the layers its definition zeroes, in order.
    maps, zeroed, n = {}, {}, L
    for op in order:
        if op == "depth":
            maps[op] = depth_sources(n, d.mode, d.factor, d.ignore_first, d.ignore_last)
            zeroed[op] = is_new_depth_copy(maps[op]) if d.identity_init else [False] * len(maps[op])
        elif op == "insert":
            maps[op], zeroed[op] = insert_sources(n, ins.every, ins.after)
        else:
            maps[op], zeroed[op] = list(range(n)), [False] * n
        n = len(maps[op])
    # index of every final layer in the output of each operator (walking back from the last one)
    idx, at = list(range(n)), {}
    for op in reversed(order):
        at[op] = idx
        idx = [maps[op][i] for i in idx]
    zero_layer = [any(zeroed[op][at[op][j]] for op in order) for j in range(n)]
    # Width noise is keyed by the layer's index in width's output: width before depth widens each
    # source layer once and depth copies it; depth first widens every target layer on its own.
    expert_op = "upcycle" if u else "width"
    noise_layer = at[expert_op] if expert_op in at else list(range(n))
    return idx, zero_layer, noise_layer


def _grown_layer_tensor(key: str, x: torch.Tensor, E: int, ls: int, noise_layer: int, growth, init_std: float):
    """One layer's tensor ``x`` (of source layer ``ls``) in a target layer; ``key`` names it (either form)."""
    w, u = growth.width, growth.upcycle
    esrc, copy = width_sources(E, w.factor, w.expert_layout) if w else (list(range(E)), [0] * E)
    if u is not None:
        return _upcycled(key, x, *upcycle_sources(E, u, ls), u, growth.seed, noise_layer)
    if w is None:
        return x.clone()
    if key.endswith("mlp.router.weight"):
        return _router(x, esrc, copy, w, growth.seed, noise_layer, init_std)
    if key.endswith("mlp.router.expert_bias"):
        return _bias(x, esrc, copy, w, growth.seed, noise_layer)
    if _is_routed_expert(key, "linear_fc1.weight") or _is_routed_expert(key, "linear_fc2.weight"):
        name = FC1 if key.endswith("linear_fc1.weight") else FC2
        return _experts(x, name, esrc, copy, w, growth.seed, noise_layer, init_std)
    if ".mlp.experts.experts." in key:
        return x[esrc].clone()  # expert biases: exact copies
    return x.clone()  # norms, attention, shared experts, dense MLPs: exact copies


def expected_grown(src: dict, growth, init_method_std: float) -> dict:
    """Every tensor of the grown checkpoint, from the source's plain tensors and the growth config
    (an all-MoE stack: per-layer tensors stacked ``[L, ...]``)."""
    assert not (growth.width and growth.upcycle), "the oracle composes the layer operators with one expert operator"
    layer_keys = [k for k in src if k.startswith("decoder.layers.")]
    router = src[next(k for k in layer_keys if k.endswith("mlp.router.weight"))]
    L, E = router.shape[0], router.shape[1]
    lsrc, zero_layer, noise_layer = _layer_plan(L, growth)
    out = {k: v.clone() for k, v in src.items() if not k.startswith("decoder.layers.")}
    for key in layer_keys:
        rows = []
        for j, ls in enumerate(lsrc):
            t = _grown_layer_tensor(key, src[key][ls], E, ls, noise_layer[j], growth, init_method_std)
            if zero_layer[j] and _zeroed_by_identity_init(key):
                t = torch.zeros_like(t)  # applied last, after any width noise
            rows.append(t)
        out[key] = torch.stack(rows)
    return out


def expected_grown_per_layer(src: dict, growth, init_method_std: float) -> dict:
    """The same for a mixed dense/MoE stack, which Megatron-Core stores one key per layer
    (``decoder.layers.<i>.<name>``, routed experts ``[E, ...]``): target layer j holds every tensor of its
    source layer under ``decoder.layers.<j>.``; a dense layer stays dense, its MLP copied exactly."""
    assert not (growth.width and growth.upcycle), "the oracle composes the layer operators with one expert operator"
    by_layer: dict[int, dict] = {}
    for key, value in src.items():
        m = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", key)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = value
    E = next(v.shape[0] for layer in by_layer.values() for k, v in layer.items() if k == "mlp.router.weight")
    lsrc, zero_layer, noise_layer = _layer_plan(len(by_layer), growth)
    out = {k: v.clone() for k, v in src.items() if not k.startswith("decoder.layers.")}
    for j, ls in enumerate(lsrc):
        for name, x in by_layer[ls].items():
            key = f"decoder.layers.{j}.{name}"
            t = _grown_layer_tensor(key, x, E, ls, noise_layer[j], growth, init_method_std)
            out[key] = torch.zeros_like(t) if zero_layer[j] and _zeroed_by_identity_init(key) else t
    return out


def _upcycled(key, x, esrc, copy, u, seed, layer):
    """Upcycling: router rows, expert biases and routed experts exact copies through the map; each copy's
    router expert_bias gets + bias_noise * eps, eps = N(0, 1) keyed by (seed, router.expert_bias, layer,
    target expert); with unselected_copies it is min(source bias) - 2 - bias_noise * |eps| instead."""
    if not (key.endswith(("mlp.router.weight", "mlp.router.expert_bias")) or ".mlp.experts.experts." in key):
        return x.clone()
    out = x[esrc].clone()
    if key.endswith("mlp.router.expert_bias") and (u.bias_noise > 0 or u.unselected_copies):
        for e, c in enumerate(copy):
            if c:
                eps = draw(seed, BIAS, layer, e, ()) * u.bias_noise
                value = x.float().min() - 2.0 - eps.abs() if u.unselected_copies else out[e].float() + eps
                out[e] = value.to(out.dtype)
    return out


def _router(r_EH, esrc, copy, w, seed, layer, init_std):
    out = r_EH[esrc].clone()
    if w.new_experts == "random":
        for e, c in enumerate(copy):
            if c:
                out[e] = (draw(seed, ROUTER, layer, e, tuple(r_EH.shape[1:])) * init_std).to(out.dtype)
        return out
    if w.noise != "gaussian":
        return out  # antithetic and none keep the router rows exact
    scale = w.alpha * std6(r_EH)
    if scale == 0.0:
        return out
    for e, c in enumerate(copy):
        if c:
            out[e] = (out[e].float() + draw(seed, ROUTER, layer, e, tuple(r_EH.shape[1:])) * scale).to(out.dtype)
    return out


def _bias(b_E, esrc, copy, w, seed, layer):
    out = b_E[esrc].clone()
    if w.zero_expert_bias:
        return torch.zeros_like(out)
    if w.new_experts == "random":
        return torch.stack([out[e] if c == 0 else torch.zeros_like(out[e]) for e, c in enumerate(copy)])
    if w.noise != "gaussian":
        return out
    scale = w.alpha * std6(b_E)
    if scale == 0.0:
        return out
    for e, c in enumerate(copy):
        if c:
            out[e] = (out[e].float() + draw(seed, BIAS, layer, e, ()) * scale).to(out.dtype)
    return out


def _experts(x_E, name, esrc, copy, w, seed, layer, init_std):
    """All target experts of one layer for one tensor name, from the source layer's ``[E, ...]``."""
    shape = tuple(x_E.shape[1:])
    per_layer = w.noise_granularity == "per_layer"
    out = []
    for e, (es, c) in enumerate(zip(esrc, copy)):
        x = x_E[es]
        if w.new_experts == "random":
            out.append(x.clone() if c == 0 else (draw(seed, name, layer, e, shape) * init_std).to(x.dtype))
            continue
        std = std6(x_E) if per_layer else std6(x_E[es])
        scale = w.alpha * std
        if w.noise == "none" or scale == 0.0 or (w.noise == "gaussian" and c == 0):
            out.append(x.clone())
        elif w.noise == "gaussian":
            out.append((x.float() + draw(seed, name, layer, e, shape) * scale).to(x.dtype))
        elif name == FC1:
            out.append(x.clone())  # antithetic: fc1 exact, so every member's hidden activation is the source's
        else:
            # antithetic fc2: member c < m-1 adds eps_c, the last adds -(eps_0 + ... + eps_{m-2}); the
            # eps are keyed by the *source* expert and the stream c, so the group's noise sums to zero.
            eps = [draw(seed, name, layer, es, shape, stream=i) * scale for i in range(w.factor - 1)]
            if c < w.factor - 1:
                delta = eps[c]
            else:
                total = eps[0]
                for more in eps[1:]:
                    total = total + more
                delta = -total
            out.append((x.float() + delta).to(x.dtype))
    return torch.stack(out)


def noise_std_ratio(delta: torch.Tensor, expected_std: float) -> float:
    """Measured std of ``delta`` over the std the definition asks for (about 1 when right)."""
    return delta.double().std().item() / expected_std if expected_std else math.nan
