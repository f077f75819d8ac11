"""The test oracle's reading of the operator definitions, pinned on cases worked out by hand.

``tests/distributed/oracle.py`` is what the sharded growth is compared with, so its own index
maps and draws are checked here against literal lists and the pinned golden draw (the same
numbers ``test_growth_noise.test_generator_golden_values`` pins for the operator code).
"""

import pytest

from tests.distributed import oracle


def test_interposition_maps():
    assert oracle.depth_sources(4, "interposition", 2) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert oracle.depth_sources(4, "interposition", 3, 1, 1) == [0, 1, 1, 1, 2, 2, 2, 3]
    assert oracle.is_new_depth_copy([0, 1, 1, 1, 2, 2, 2, 3]) == [False, False, True, True, False, True, True, False]


def test_stack_maps():
    assert oracle.depth_sources(3, "stack", 2) == [0, 1, 2, 0, 1, 2]
    assert oracle.depth_sources(4, "stack", 3, 1, 0) == [0, 1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert oracle.depth_sources(4, "stack", 2, 1, 1) == [0, 1, 2, 1, 2, 3]


def test_width_maps():
    assert oracle.width_sources(3, 2, "append") == ([0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1])
    assert oracle.width_sources(3, 2, "interleave") == ([0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1])


def test_draw_matches_the_pinned_golden_values():
    x = oracle.draw(1234, "experts.linear_fc1", 3, 5, (3,))
    assert x.tolist() == pytest.approx([-0.7734389901161194, -0.22468942403793335, -0.02552511915564537], abs=1e-7)


def test_std6_rounds_to_six_significant_digits():
    import torch

    t = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)  # unbiased std sqrt(5/3) = 1.2909944...
    assert oracle.std6(t) == 1.29099
    assert oracle.std6(torch.tensor([2.0])) == 0.0
