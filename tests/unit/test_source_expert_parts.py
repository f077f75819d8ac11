"""Which read requests a whole source expert serves (``source_reads._parts_within_units``), from the
definition: same stored tensor, same (layer, expert), region inside the expert."""

from __future__ import annotations

from types import SimpleNamespace

from megatron_grow.growth.source_reads import _parts_within_units

FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"


def request(key, offset, shape, prepend=2):
    return SimpleNamespace(key=key, global_offset=tuple(offset), local_shape=tuple(shape), prepend_axis_num=prepend)


def test_whole_experts_and_the_gated_halves_are_served_and_nothing_else():
    # two layers x four experts of a gated fc1 of 64 rows (gate 0-31, up 32-63) and 8 columns
    units = [request(FC1, (ls, es, 0, 0), (64, 8)) for ls in range(2) for es in range(4)]
    wanted = {
        "whole": request(FC1, (1, 2, 0, 0), (64, 8)),
        "gate": request(FC1, (0, 3, 0, 0), (32, 8)),
        "up": request(FC1, (0, 3, 32, 0), (32, 8)),
        "columns": request(FC1, (1, 0, 0, 4), (64, 4)),          # a column half (expert TP): inside too
        "past_the_end": request(FC1, (1, 0, 40, 0), (32, 8)),    # rows 40-71 of 64: not inside
        "other_layer": request(FC1, (2, 0, 0, 0), (64, 8)),      # no such source layer among the units
        "other_key": request("decoder.layers.mlp.experts.experts.linear_fc2.weight", (0, 3, 0, 0), (8, 32)),
        "other_prepend": request(FC1, (0, 3, 0), (64, 8), prepend=1),
    }
    parts = _parts_within_units(units, wanted)
    got = {rid: (u, region) for u, found in parts.items() for rid, region in found}
    assert got == {
        "whole": (1 * 4 + 2, (slice(0, 64), slice(0, 8))),
        "gate": (3, (slice(0, 32), slice(0, 8))),
        "up": (3, (slice(32, 64), slice(0, 8))),
        "columns": (4, (slice(0, 64), slice(4, 8))),
    }
