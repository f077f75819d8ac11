"""Depth and width index maps on small shapes, against hand-written expected tuples."""

import pytest

from megatron_grow.config.schema import grown_depth
from megatron_grow.growth.operators.depth import build_depth_map
from megatron_grow.growth.operators.width import build_width_map


def test_interposition_k2():
    m = build_depth_map(3, "interposition", 2)
    assert m.source_layer == (0, 0, 1, 1, 2, 2)
    assert m.is_new_copy == (False, True, False, True, False, True)


def test_interposition_k3():
    m = build_depth_map(2, "interposition", 3)
    assert m.source_layer == (0, 0, 0, 1, 1, 1)
    assert m.is_new_copy == (False, True, True, False, True, True)


def test_interposition_is_j_div_k():
    for L in (1, 2, 5):
        for k in (2, 3, 4):
            assert build_depth_map(L, "interposition", k).source_layer == tuple(j // k for j in range(k * L))


def test_interposition_ignores():
    m = build_depth_map(5, "interposition", 2, ignore_first=1, ignore_last=2)
    assert m.source_layer == (0, 1, 1, 2, 2, 3, 4)
    assert m.is_new_copy == (False, False, True, False, True, False, False)


def test_stack_k2():
    m = build_depth_map(3, "stack", 2)
    assert m.source_layer == (0, 1, 2, 0, 1, 2)
    assert m.is_new_copy == (False, False, False, True, True, True)


def test_stack_k3():
    assert build_depth_map(2, "stack", 3).source_layer == (0, 1, 0, 1, 0, 1)


def test_stack_ignores_k2():
    # copy 0 leaves out the last layer, copy 1 leaves out the first (the paper's scripts)
    m = build_depth_map(4, "stack", 2, ignore_first=1, ignore_last=1)
    assert m.source_layer == (0, 1, 2, 1, 2, 3)
    assert m.is_new_copy == (False, False, False, True, True, False)


def test_stack_ignores_k3():
    m = build_depth_map(5, "stack", 3, ignore_first=1, ignore_last=1)
    assert m.source_layer == (0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4)
    assert m.is_new_copy == (False,) * 4 + (True,) * 6 + (False,)


@pytest.mark.parametrize("mode", ["interposition", "stack"])
@pytest.mark.parametrize("L,k,first,last", [(28, 2, 0, 0), (28, 2, 2, 2), (20, 4, 0, 0), (6, 3, 1, 2)])
def test_target_depth_formula(mode, L, k, first, last):
    m = build_depth_map(L, mode, k, first, last)
    assert m.num_layers == grown_depth(L, k, first, last) == k * L - (k - 1) * (first + last)
    # every source layer present; ignored ones exactly once, the rest k times
    for i in range(L):
        expected = 1 if (i < first or i >= L - last) else k
        assert m.source_layer.count(i) == expected
    assert sum(not c for c in m.is_new_copy) == L


def test_paper_17b_to_35b():
    assert build_depth_map(28, "interposition", 2).num_layers == 56


def test_depth_rejects_bad_input():
    with pytest.raises(ValueError):
        build_depth_map(4, "sandwich", 2)
    with pytest.raises(ValueError):
        build_depth_map(4, "stack", 2, ignore_first=2, ignore_last=2)


def test_width_append():
    m = build_width_map(3, 2, "append")
    assert m.source_expert == (0, 1, 2, 0, 1, 2)
    assert m.copy_index == (0, 0, 0, 1, 1, 1)


def test_width_append_m3():
    m = build_width_map(2, 3, "append")
    assert m.source_expert == (0, 1, 0, 1, 0, 1)
    assert m.copy_index == (0, 0, 1, 1, 2, 2)


def test_width_interleave():
    m = build_width_map(3, 2, "interleave")
    assert m.source_expert == (0, 0, 1, 1, 2, 2)
    assert m.copy_index == (0, 1, 0, 1, 0, 1)


def test_width_interleave_m3():
    m = build_width_map(2, 3, "interleave")
    assert m.source_expert == (0, 0, 0, 1, 1, 1)
    assert m.copy_index == (0, 1, 2, 0, 1, 2)


def test_width_rejects_unknown_layout():
    with pytest.raises(ValueError):
        build_width_map(4, 2, "shuffle")


def test_writer_slots_give_each_block_the_copies_of_its_own_inputs():
    from megatron_grow.growth.mapping import writer_slots

    # 4 inputs appended twice (outputs 0-3 originals, 4-7 copies), 2 blocks: block 0 (slots 0-3) holds
    # inputs 0, 1 and their copies 4, 5; block 1 inputs 2, 3 and copies 6, 7.
    assert writer_slots([0, 1, 2, 3, 0, 1, 2, 3], 4, 2) == (0, 1, 4, 5, 2, 3, 6, 7)
    # Interleaved copies and the identity already match their blocks: unchanged.
    assert writer_slots([0, 0, 1, 1, 2, 2, 3, 3], 4, 2) == tuple(range(8))
    assert writer_slots([0, 1, 2, 3], 4, 4) == (0, 1, 2, 3)
    # Uneven copies (input 0 copied 4 times): block 0 takes 4 of its 5 outputs, the fifth fills block 1's
    # free slot.
    assert writer_slots([0, 0, 0, 0, 1, 2, 3, 3], 4, 2) == (0, 1, 2, 3, 5, 6, 7, 4)
    # One block, or blocks that do not divide the outputs: the layout's own order.
    assert writer_slots([0, 1, 0, 1], 2, 1) == (0, 1, 2, 3)
    assert writer_slots([0, 1, 2, 0, 1, 2], 3, 4) == tuple(range(6))


def test_writer_slots_are_a_permutation_for_every_operator_shape():
    import itertools

    from megatron_grow.growth.mapping import writer_slots

    for n_in, factor, blocks in itertools.product((2, 3, 4, 8), (1, 2, 3), (1, 2, 4)):
        for source in ([i % n_in for i in range(n_in * factor)], [i // factor for i in range(n_in * factor)]):
            slots = writer_slots(source, n_in, blocks)
            assert sorted(slots) == list(range(len(source))), (source, blocks)
