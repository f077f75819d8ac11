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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counts_are_exact_on_both_paths(dtype):
    from megatron_grow.checkpoint.integrity import non_finite_counts

    big = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)
    assert non_finite_counts(big) == (0, 0)  # the sum overflows; the count decides
    t = torch.randn(4096).to(dtype)
    assert non_finite_counts(t) == (0, 0)
    t[[1, 2, 3]] = float("nan")
    t[[10, 4000]] = torch.tensor([float("inf"), float("-inf")], dtype=dtype)
    assert non_finite_counts(t) == (3, 2)


def test_fill_check_finds_a_nan_left_and_passes_infinities():
    from megatron_grow.checkpoint.fill_check import poison_parameters, verify_all_sourced
    from megatron_grow.errors import GrowthError

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    poison_parameters([model])
    with pytest.raises(GrowthError, match="4 tensors"):
        verify_all_sourced([model])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
        model[0].weight[0, 0], model[0].weight[1, 1] = float("inf"), float("-inf")  # sum NaN, yet no NaN
        verify_all_sourced([model])
        model[1].bias[3] = float("nan")
    with pytest.raises(GrowthError, match=r"1 tensors .*1\.bias"):
        verify_all_sourced([model])


def test_regions_written_in_full_need_no_nan_proof_and_the_rest_is_still_checked():
    from megatron_grow.checkpoint.fill_check import poison_parameters, verify_all_sourced
    from megatron_grow.errors import GrowthError

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    w1 = model[1].weight
    written = [model[0].weight, w1[:4], w1[4:], model[1].bias[:3], model[0].bias[::2]]  # halves; a part; strided
    poisoned = poison_parameters([model], written_in_full=written)
    # covered: 0.weight (whole), 1.weight (two contiguous halves); not: a part of 1.bias, a strided view of 0.bias
    assert sorted(name for _, name, _ in poisoned) == ["0.bias", "1.bias"]
    assert not torch.isnan(model[0].weight).any() and torch.isnan(model[1].bias).all()
    with pytest.raises(GrowthError, match="2 tensors"):
        verify_all_sourced([model], poisoned)
    with torch.no_grad():
        model[0].bias.zero_()
        model[1].bias[:3] = 0.0  # only the part the caller promised
    with pytest.raises(GrowthError, match=r"1 tensors .*1\.bias"):
        verify_all_sourced([model], poisoned)
