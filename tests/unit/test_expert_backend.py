"""grouped_linear against its definition, and the recipe checks of model.moe_expert_backend."""

from __future__ import annotations

import pytest
import torch

from megatron_grow.config.loader import load_recipe
from megatron_grow.errors import ConfigError
from megatron_grow.models import experts
from megatron_grow.models.experts import grouped_linear


@pytest.mark.parametrize("counts", [[3, 0, 7], [0, 0, 0], [5, 5, 5], [13, 0, 0]])
def test_grouped_linear_is_one_matmul_per_expert(counts):
    g = torch.Generator().manual_seed(sum(counts))
    x = torch.randn(sum(counts), 16, generator=g, requires_grad=True)
    w = torch.randn(len(counts), 24, 16, generator=g, requires_grad=True)
    grad_out = torch.randn(sum(counts), 24, generator=g)
    offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    grouped_linear(x, w, offsets).backward(grad_out)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    starts = [0] + offsets.tolist()[:-1]
    # Definition: rows of expert e times weight e transposed, in expert order.
    expected = torch.cat([x2[s:s + n] @ w2[e].t() for e, (s, n) in enumerate(zip(starts, counts))])
    expected.backward(grad_out)
    torch.testing.assert_close(grouped_linear(x.detach(), w.detach(), offsets), expected.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides,expect", [
    (["model.moe_expert_backend=fast"], "model.moe_expert_backend"),
    (["model.moe_expert_backend=grouped_mm", "model.hidden_size=60"], "model.hidden_size to be a multiple of 8"),
    (["model.moe_expert_backend=grouped_mm", "model.moe_ffn_hidden_size=36"], "moe_ffn_hidden_size / expert TP"),
    (["model.moe_expert_backend=grouped_mm", "model.add_bias_linear=true"], "no linear biases"),
    (["model.moe_expert_backend=grouped_mm", "model.moe_grouped_gemm=true"], "moe_grouped_gemm=false"),
])
def test_recipe_refuses_what_grouped_mm_cannot_run(overrides, expect):
    with pytest.raises(ConfigError, match=expect):
        load_recipe("configs/models/tiny.yaml", overrides)


def test_tiny_recipe_accepts_grouped_mm_with_expert_tp():
    recipe = load_recipe("configs/models/tiny.yaml", ["model.moe_expert_backend=grouped_mm",
                                                       "parallel.tensor_model_parallel_size=2"])
    assert recipe.model.moe_expert_backend == "grouped_mm"


@pytest.mark.parametrize("missing", [["grouped_mm"], ["grouped_mm", "_grouped_mm"]])
def test_grouped_linear_runs_on_a_torch_without_f_grouped_mm(monkeypatch, missing):
    """setup.py admits torch 2.6; F.grouped_mm exists from 2.10 (torch._grouped_mm from 2.8, CUDA
    only): the kernel is chosen by what exists, and the result is still the definition's."""
    for name in missing:
        monkeypatch.delattr(torch.nn.functional if name == "grouped_mm" else torch, name, raising=False)
    counts = [3, 0, 5]
    x, w = torch.randn(8, 16), torch.randn(3, 24, 16)
    offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    expected = torch.cat([x[:3] @ w[0].t(), x[3:3] @ w[1].t(), x[3:] @ w[2].t()])
    torch.testing.assert_close(grouped_linear(x, w, offsets), expected, atol=1e-5, rtol=0)
    assert experts.grouped_mm_problem(on_cuda=False) is None  # the CPU runs the loop either way


def test_grouped_mm_on_cuda_without_any_kernel_is_refused(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    problem = experts.grouped_mm_problem(on_cuda=True)
    assert "needs torch >= 2.8" in problem and torch.__version__ in problem and "sequential" in problem
