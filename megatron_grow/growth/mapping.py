"""Growth operators as index maps: which source layer / expert each target layer / expert reads.

Pure integer arithmetic, no tensors and no I/O. Both the plain-tensor oracle
(``growth.reference``) and the sharded loader rewrite their reads through these maps, so
the two agree by construction on *where* every target tensor comes from; ``growth.noise``
decides what is added on top.

Conventions (0-based everywhere, like ``layer_idx`` and ``global_expert_idx``):

- depth: ``source_layer[j]`` is the source layer that target layer ``j`` copies;
  ``is_new_copy[j]`` is False for the first occurrence of each source layer (the
  "original") and True for the others (the copies ``identity_init`` zeroes).
- width: ``source_expert[e]`` is the source expert that target expert ``e`` copies;
  ``copy_index[e]`` is 0 for the original and 1..m-1 for its copies.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_grow.config.growth_rules import grown_depth
from megatron_grow.config.schema import DepthMode, ExpertLayout, values

DEPTH_MODES = values(DepthMode)
EXPERT_LAYOUTS = values(ExpertLayout)


@dataclass(frozen=True)
class DepthMap:
    """Target layer -> source layer, and whether the target layer is a (non-first) copy."""

    source_layer: tuple[int, ...]
    is_new_copy: tuple[bool, ...]

    @property
    def num_layers(self) -> int:
        return len(self.source_layer)


@dataclass(frozen=True)
class WidthMap:
    """Target expert -> source expert, and which member of its copy group it is (0 = original)."""

    source_expert: tuple[int, ...]
    copy_index: tuple[int, ...]

    @property
    def num_experts(self) -> int:
        return len(self.source_expert)


def build_depth_map(num_layers: int, mode: str, factor: int, ignore_first: int = 0,
                    ignore_last: int = 0) -> DepthMap:
    """Index map of depth growth.

    interposition: ``[0]*1 .. [first-1]*1, [first]*k, ..., [L-last-1]*k, [L-last]*1 .. [L-1]*1``
    (without ignores, target ``j`` reads ``j // k``).
    stack: the block repeated k times (``j % L`` without ignores); copy 0 covers
    ``[0, L-last)``, middle copies ``[first, L-last)``, the final copy ``[first, L)``, so the
    first/last ``N`` layers appear only at the very bottom/top (the paper's scripts).
    """
    if mode not in DEPTH_MODES:
        raise ValueError(f"depth mode {mode!r} is not one of {DEPTH_MODES}")
    if factor < 1:
        raise ValueError(f"depth factor must be >= 1, got {factor}")
    if ignore_first < 0 or ignore_last < 0 or ignore_first + ignore_last >= num_layers:
        raise ValueError(f"ignore_first + ignore_last ({ignore_first} + {ignore_last}) must be >= 0 and "
                         f"< num_layers ({num_layers})")
    first, last, L = ignore_first, ignore_last, num_layers
    if mode == DepthMode.INTERPOSITION:
        src: list[int] = []
        for i in range(L):
            repeats = factor if first <= i < L - last else 1
            src.extend([i] * repeats)
    else:
        src = list(range(0, L - last))
        for _ in range(factor - 2):
            src.extend(range(first, L - last))
        if factor >= 2:
            src.extend(range(first, L))
        else:  # factor 1: identity
            src.extend(range(L - last, L))
    seen: set[int] = set()
    new_copy = []
    for s in src:
        new_copy.append(s in seen)
        seen.add(s)
    assert len(src) == grown_depth(L, factor, first, last)
    return DepthMap(tuple(src), tuple(new_copy))


def build_width_map(num_experts: int, factor: int, layout: str) -> WidthMap:
    """Index map of width growth: E -> m*E experts.

    append: target ``e`` reads ``e % E`` and is copy ``e // E`` (copies after all originals).
    interleave: target ``e`` reads ``e // m`` and is copy ``e % m`` (``[e0, e0', e1, e1', ...]``).
    """
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert layout {layout!r} is not one of {EXPERT_LAYOUTS}")
    if factor < 1 or num_experts < 1:
        raise ValueError(f"need num_experts >= 1 and factor >= 1, got {num_experts} and {factor}")
    n = num_experts * factor
    if layout == ExpertLayout.APPEND:
        return WidthMap(tuple(e % num_experts for e in range(n)), tuple(e // num_experts for e in range(n)))
    return WidthMap(tuple(e // factor for e in range(n)), tuple(e % factor for e in range(n)))


def identity_depth_map(num_layers: int) -> DepthMap:
    return DepthMap(tuple(range(num_layers)), (False,) * num_layers)


def identity_width_map(num_experts: int) -> WidthMap:
    return WidthMap(tuple(range(num_experts)), (0,) * num_experts)
