"""Growth noise primitives: deterministic draws and layout-independent stds.

The operators that add noise (``growth.operators.width``) draw it here, so every draw follows
one contract.

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
- The std that scales the noise is passed in by the caller (``transforms.grow_expert_tensor``
  never computes it), because a sharded caller sees only slices: it computes moments per slice
  (``tensor_moments``), combines them (``combine_moments``) and rounds with
  ``canonical_std``. See ``canonical_std`` for why the rounding exists.

Legend for shape suffixes: E experts, H model dim, F expert FFN dim.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

FC1_KEY = "experts.linear_fc1"
FC2_KEY = "experts.linear_fc2"
ROUTER_KEY = "router.weight"
EXPERT_BIAS_KEY = "router.expert_bias"
EXPERT_KEYS = (FC1_KEY, FC2_KEY)

_MASK_63 = (1 << 63) - 1


# ----------------------------------------------------------------------------------------------
# Generators


def noise_seed(seed: int, logical_key: str, layer: int, expert: int, stream: int = 0) -> int:
    """A stable 63-bit seed for one draw: first 8 bytes of SHA-256 of the tuple, masked.

    Args:
        seed: ``growth.seed``.
        logical_key: one of the logical keys above.
        layer: the layer index that keys the draw.
        expert: the expert index (or router row) that keys the draw.
        stream: separates several draws for the same tensor.

    Returns:
        The seed.
    """
    text = f"megatron_grow.noise|{int(seed)}|{logical_key}|{int(layer)}|{int(expert)}|{int(stream)}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & _MASK_63


def noise_generator(seed: int, logical_key: str, layer: int, expert: int, *, stream: int = 0) -> torch.Generator:
    """A fresh CPU generator for ``(seed, logical_key, layer, expert[, stream])`` (``noise_seed``'s arguments).

    ``stream`` separates several draws for the same tensor (antithetic noise draws one per
    copy-group member).

    Returns:
        A seeded ``torch.Generator``.
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
    """Moments of all elements of ``t``, computed in float64.

    Args:
        t: any tensor (any device, any dtype).

    Returns:
        (count, mean, M2).
    """
    n = t.numel()
    if n == 0:
        return Moments(0, 0.0, 0.0)
    t64 = t.detach().to(device="cpu", dtype=torch.float64)
    mean = t64.mean().item()
    # In place on the float64 copy (one buffer, not three); the same operations, so the same bits.
    deviations = t64.sub_(mean) if t64.data_ptr() != t.data_ptr() else t64 - mean
    return Moments(n, mean, deviations.pow_(2).sum().item())


def combine_moments(parts: Sequence[Moments]) -> Moments:
    """Chan et al.'s parallel combination, folded left in the given order.

    Args:
        parts: moments of disjoint parts.

    Returns:
        The moments of their union.
    """
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
    """Unbiased std (like ``torch.std``); 0.0 for fewer than two elements (no noise, not NaN).

    Args:
        moments: (count, mean, M2).

    Returns:
        The std.
    """
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
    """``canonical_std`` of the unbiased std of all elements of ``t``.

    Args:
        t: any tensor.

    Returns:
        The rounded std.
    """
    return canonical_std(std_from_moments(tensor_moments(t)))
