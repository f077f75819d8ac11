"""``integrity.check_finite``: one NaN or infinity anywhere is an error naming the tensor and the counts;
a finite tensor passes, also when its sum overflows (the fast path only proves finiteness)."""

from __future__ import annotations

import pytest
import torch

from megatron_grow.checkpoint.integrity import check_finite
from megatron_grow.errors import CheckpointError

BAD = {"nan": [float("nan")], "inf": [float("inf")], "-inf": [float("-inf")],
       "inf and -inf": [float("inf"), float("-inf")], "nan and inf": [float("nan"), float("inf")]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(BAD))
def test_non_finite_values_are_named(case, dtype):
    t = torch.ones(1000, dtype=dtype)
    t[[3, 700][:len(BAD[case])]] = torch.tensor(BAD[case], dtype=dtype)
    nan, inf = sum(v != v for v in BAD[case]), sum(v in (float("inf"), float("-inf")) for v in BAD[case])
    with pytest.raises(CheckpointError, match="w.1. of /ckpt holds non-finite") as e:
        check_finite("w.1.", t, "/ckpt")
    assert (f"{nan} NaN" in str(e.value)) == bool(nan) and (f"{inf} infinite" in str(e.value)) == bool(inf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_values_pass_even_when_their_sum_overflows(dtype):
    big = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)
    assert not torch.isfinite(big.sum())  # the fast path cannot decide: the exact count must
    check_finite("w", big, "/ckpt")
    check_finite("w", torch.randn(5000).to(dtype), "/ckpt")
    check_finite("ids", torch.arange(10), "/ckpt")  # integers are never non-finite
