"""Depth growth's effect on a weight-norm profile, from the definition of the copies (no checkpoint needed)."""

from __future__ import annotations

import pytest

from megatron_grow.analysis.weight_norms import depth_grown_profile, largest_drop


def test_depth_grown_profiles_and_their_drops_by_hand():
    rising = [1.0, 2.0, 3.0, 4.0]
    stack = depth_grown_profile(rising, "stack")
    assert stack == [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]
    # Neighbour changes 1, 1, 1, -3, 1, 1, 1: the seam drop 3 between layers 3 and 4, median |change| 1.
    assert largest_drop(stack) == {"layer": 3, "drop": 3.0, "ratio": 3.0}
    interposed = depth_grown_profile(rising, "interposition")
    assert interposed == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]
    assert largest_drop(interposed) == {"layer": None, "drop": 0.0, "ratio": 0.0}
    assert depth_grown_profile([2.0, 1.0], "stack", factor=3) == [2.0, 1.0] * 3
    with pytest.raises(ValueError, match="unknown depth mode 'stacked'"):
        depth_grown_profile(rising, "stacked")
