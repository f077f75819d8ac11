"""Index maps: which source layer / expert each target layer / expert reads, and their composition.

Pure integer arithmetic, no tensors and no I/O. Each growth operator (``growth.operators``)
gives one map per axis (layers, experts) from its output model to its input model; the plan
composes them in the recipe's order. Both the plain-tensor oracle (``growth.reference``) and the
sharded loader rewrite their reads through the composed maps, so the two agree by construction on
*where* every target tensor comes from; the operators' transforms decide what is added on top.

Conventions (0-based everywhere, like ``layer_idx`` and ``global_expert_idx``): ``source[j]`` is
the input index that output ``j`` copies; ``copy_index[j]`` is 0 for the first occurrence of its
source (the "original") and 1, 2, ... for the copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class IndexMap:
    """Output index -> input index along one axis, and which member of its copy group it is (0 = original)."""

    source: tuple[int, ...]
    copy_index: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.source)


def identity_map(n: int) -> IndexMap:
    """The map of an operator that leaves an axis of ``n`` entries alone.

    Args:
        n: entries on the axis.

    Returns:
        ``source[j] = j``, every entry an original.
    """
    return IndexMap(tuple(range(n)), (0,) * n)


def first_occurrence_copies(source: Sequence[int]) -> tuple[int, ...]:
    """Copy indices for ``source``: 0 at each source index's first occurrence, then 1, 2, ...

    Args:
        source: output index -> input index.

    Returns:
        One copy index per output entry.
    """
    seen: dict[int, int] = {}
    out = []
    for s in source:
        out.append(seen.get(s, 0))
        seen[s] = seen.get(s, 0) + 1
    return tuple(out)


@dataclass(frozen=True)
class ComposedMap:
    """Maps of several operators applied in order, read from the final model back to the first.

    ``source[j]``: the index in the first model that final entry ``j`` reads; ``copy_index[j]``:
    the copy index of the last operator (from the final model's side) that made ``j`` a copy, 0 when
    none did; ``after[k][j]``: the index of final entry ``j`` in the output of operator ``k``.
    """

    source: tuple[int, ...]
    copy_index: tuple[int, ...]
    after: tuple[tuple[int, ...], ...]


def compose(maps: Sequence[IndexMap], final_size: int) -> ComposedMap:
    """Compose ``maps`` (operator ``k``'s map from its output to its input, in the order applied).

    Args:
        maps: one map per operator, in the order the operators run.
        final_size: the number of entries in the last operator's output.

    Returns:
        The composed map (see :class:`ComposedMap`).
    """
    current = list(range(final_size))
    copies = [0] * final_size
    after: list[tuple[int, ...]] = []
    for m in reversed(maps):
        after.append(tuple(current))
        copies = [c if c else m.copy_index[i] for c, i in zip(copies, current)]
        current = [m.source[i] for i in current]
    return ComposedMap(tuple(current), tuple(copies), tuple(reversed(after)))


def writer_slots(source: Sequence[int], num_sources: int, blocks: int) -> tuple[int, ...]:
    """Which output entry each writing slot produces, so that each block of slots copies its own block
    of inputs as far as the counts allow.

    Slots ``0 .. n-1`` fall into ``blocks`` contiguous equal blocks (a layout's expert-parallel ranks:
    block ``b`` holds slots ``b*n/blocks ..``), and so do the inputs (``i*blocks // num_sources``). Block
    ``b``'s slots take, in order, the outputs whose input lies in input block ``b``; outputs left over
    (a block with more copies of its inputs than slots) fill the free slots in order. A map under which
    every block already copies its own inputs (identity, interleaved copies) is returned unchanged.

    Why: any rank may write any chunk of a sharded checkpoint (a load finds each by its global offset),
    so an offline growth lets the rank that reads an input write all of its copies, instead of following
    the layout (where appended copies of every input land on the last ranks, which must then receive
    every input and draw all the noise).

    Args:
        source: output entry -> input entry (``IndexMap.source`` of one layer).
        num_sources: the number of input entries.
        blocks: the number of writer blocks (it divides ``len(source)``).

    Returns:
        ``entry[s]``: the output entry slot ``s`` writes; a permutation of ``range(len(source))``.
    """
    n = len(source)
    if blocks <= 1 or n % blocks:
        return tuple(range(n))
    per_block = n // blocks
    wanted = [[j for j in range(n) if source[j] * blocks // num_sources == b] for b in range(blocks)]
    entry: list[int | None] = [None] * n
    leftover: list[int] = []
    for b, outputs in enumerate(wanted):
        entry[b * per_block:b * per_block + min(per_block, len(outputs))] = outputs[:per_block]
        leftover += outputs[per_block:]
    free = [s for s in range(n) if entry[s] is None]
    for s, j in zip(free, sorted(leftover)):
        entry[s] = j
    return tuple(entry)
