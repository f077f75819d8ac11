"""Width-growth noise: determinism, statistics, antithetic sums, slice independence, moments."""

import math

import pytest
import torch

from megatron_grow.config.schema import DepthGrowthConfig, GrowthConfig, ModelConfig, WidthGrowthConfig
from megatron_grow.growth.noise import (
    FC1_KEY,
    FC2_KEY,
    canonical_std,
    combine_moments,
    noise_generator,
    noise_seed,
    std_from_moments,
    tensor_moments,
)
from megatron_grow.growth.operators.depth import zeroed_by_identity_init
from megatron_grow.growth.plan import make_growth_plan
from megatron_grow.growth.transforms import grow_expert_bias, grow_expert_tensor, grow_router

SRC = ModelConfig(num_layers=2, num_moe_experts=4, moe_router_topk=2, init_method_std=0.02)


def plan(order=(), depth=None, **width):
    w = WidthGrowthConfig(**width) if width is not None else None
    return make_growth_plan(SRC, GrowthConfig(order=order, depth=depth, width=w, seed=7))


def src_tensor(shape=(256, 128), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05 + 0.01).to(dtype)


def test_generator_deterministic_and_keyed():
    a = torch.randn(100, generator=noise_generator(1, FC1_KEY, 3, 5))
    b = torch.randn(100, generator=noise_generator(1, FC1_KEY, 3, 5))
    assert torch.equal(a, b)
    others = [noise_generator(2, FC1_KEY, 3, 5), noise_generator(1, FC2_KEY, 3, 5),
              noise_generator(1, FC1_KEY, 4, 5), noise_generator(1, FC1_KEY, 3, 6),
              noise_generator(1, FC1_KEY, 3, 5, stream=1)]
    for g in others:
        assert not torch.equal(a, torch.randn(100, generator=g))
    # a fixed value: the seed must never change across runs/processes (no salted hash())
    assert noise_seed(1, FC1_KEY, 3, 5) == noise_seed(1, FC1_KEY, 3, 5) < 2 ** 63
    assert noise_seed(0, "x", 0, 0) != noise_seed(0, "x", 0, 1)


def test_generator_golden_values():
    # Pinned: a change here changes every grown checkpoint (and would mean a salted or
    # platform-dependent hash crept in). Python's hash() would differ between processes.
    assert noise_seed(1234, "experts.linear_fc1", 3, 5) == 4762680979373107684
    x = torch.randn(3, generator=noise_generator(1234, "experts.linear_fc1", 3, 5))
    assert x.tolist() == pytest.approx([-0.7734389901161194, -0.22468942403793335, -0.02552511915564537],
                                       abs=1e-7)


def test_moments_match_torch_and_combine():
    t = src_tensor((64, 33))
    n, mean, m2 = tensor_moments(t)
    assert n == t.numel()
    assert math.isclose(mean, t.double().mean().item(), rel_tol=1e-12)
    assert math.isclose(std_from_moments((n, mean, m2)), t.double().std().item(), rel_tol=1e-12)
    parts = [tensor_moments(c) for c in torch.split(t.flatten(), [100, 1, 900, 1111])]
    combined = combine_moments(parts)
    assert combined[0] == n
    assert math.isclose(std_from_moments(combined), t.double().std().item(), rel_tol=1e-12)
    assert canonical_std(std_from_moments(combined)) == canonical_std(std_from_moments((n, mean, m2)))
    assert std_from_moments(tensor_moments(torch.ones(1))) == 0.0
    assert std_from_moments(tensor_moments(torch.full((5,), 3.0))) == 0.0


def test_canonical_std_rounds_to_six_digits():
    assert canonical_std(0.0123456789) == 0.0123457
    assert canonical_std(0.0123456789 * (1 + 1e-14)) == canonical_std(0.0123456789)
    assert canonical_std(0.0) == 0.0


@pytest.mark.parametrize("key", [FC1_KEY, FC2_KEY])
def test_gaussian_copies_have_alpha_std_noise(key):
    p = plan(noise="gaussian", alpha=0.01)
    src = src_tensor((512, 256))
    std = canonical_std(src.double().std().item())
    orig = grow_expert_tensor(p, key, 0, 1, src, std)
    copy = grow_expert_tensor(p, key, 0, 5, src, std)  # target 5 = copy of expert 1 (append)
    assert p.expert_source[0][5] == 1 and p.expert_copy_index[0][5] == 1
    assert torch.equal(orig, src)
    diff = (copy.double() - src.double())
    assert diff.abs().max() > 0
    assert abs(diff.std().item() / (0.01 * std) - 1) < 0.05
    assert abs(diff.mean().item()) < 0.01 * std * 0.05


def test_gaussian_noise_differs_by_layer_and_expert():
    p = plan(noise="gaussian")
    src = src_tensor((32, 16))
    a = grow_expert_tensor(p, FC1_KEY, 0, 4, src, 0.05)
    assert torch.equal(a, grow_expert_tensor(p, FC1_KEY, 0, 4, src, 0.05))  # deterministic
    assert not torch.equal(a, grow_expert_tensor(p, FC1_KEY, 1, 4, src, 0.05))
    assert not torch.equal(a, grow_expert_tensor(p, FC1_KEY, 0, 5, src, 0.05))
    assert not torch.equal(a, grow_expert_tensor(p, FC2_KEY, 0, 4, src, 0.05))


def test_none_is_exact_and_keeps_dtype():
    p = plan(noise="none")
    src = src_tensor((16, 8), dtype=torch.bfloat16)
    out = grow_expert_tensor(p, FC1_KEY, 0, 6, src, 0.05)
    assert out.dtype == torch.bfloat16 and torch.equal(out, src)
    g = grow_expert_tensor(plan(noise="gaussian"), FC1_KEY, 0, 6, src, 0.05)
    assert g.dtype == torch.bfloat16 and not torch.equal(g, src)


@pytest.mark.parametrize("layout", ["append", "interleave"])
def test_antithetic_pair_sums_to_twice_source(layout):
    p = plan(noise="antithetic", alpha=0.01, expert_layout=layout)
    src = src_tensor((128, 64))
    std = canonical_std(src.double().std().item())
    members = [e for e in range(8) if p.expert_source[0][e] == 2]
    assert len(members) == 2
    fc2 = [grow_expert_tensor(p, FC2_KEY, 1, e, src, std) for e in members]
    assert not torch.equal(fc2[0], src) and not torch.equal(fc2[1], src)  # original perturbed too
    torch.testing.assert_close(fc2[0] - src, -(fc2[1] - src), rtol=0, atol=1e-7)
    torch.testing.assert_close(fc2[0] + fc2[1], 2 * src, rtol=0, atol=1e-7)
    for e in members:  # fc1 exact so every member computes the same hidden activation
        assert torch.equal(grow_expert_tensor(p, FC1_KEY, 1, e, src, std), src)


def test_antithetic_group_of_three_is_zero_sum():
    p = plan(noise="antithetic", factor=3, alpha=0.1)
    src = src_tensor((64, 32))
    members = [e for e in range(12) if p.expert_source[0][e] == 1]
    outs = [grow_expert_tensor(p, FC2_KEY, 0, e, src, 0.05) for e in members]
    torch.testing.assert_close(sum(outs), 3 * src, rtol=0, atol=1e-6)
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("noise", ["gaussian", "antithetic"])
def test_slice_independent(noise):
    p = plan(noise=noise, alpha=0.5)
    full = src_tensor((64, 48))
    out_full = grow_expert_tensor(p, FC2_KEY, 1, 7, full, 0.05)
    for region in [(slice(0, 32), slice(None)), (slice(32, 64), slice(None)),
                   (slice(None), slice(16, 40)), (slice(5, 9), slice(0, 48))]:
        part = grow_expert_tensor(p, FC2_KEY, 1, 7, full[region], 0.05, full_shape=full.shape, region=region)
        assert torch.equal(part, out_full[region])


@pytest.mark.parametrize("noise", ["gaussian", "antithetic"])
def test_random_new_experts(noise):
    p = plan(new_experts="random", noise=noise)
    src = src_tensor((256, 128))
    assert torch.equal(grow_expert_tensor(p, FC1_KEY, 0, 0, src, 0.05), src)
    assert torch.equal(grow_expert_tensor(p, FC2_KEY, 0, 0, src, 0.05), src)
    fresh = grow_expert_tensor(p, FC1_KEY, 0, 4, src, 0.05)
    assert abs(fresh.std().item() / SRC.init_method_std - 1) < 0.05
    assert abs(torch.corrcoef(torch.stack([fresh.flatten(), src.flatten()]))[0, 1]) < 0.05


def test_router_gaussian():
    p = plan(noise="gaussian", alpha=0.01)
    router = src_tensor((4, 4096))
    std = canonical_std(router.double().std().item())
    out = grow_router(p, 0, router)
    assert out.shape == (8, 4096)
    assert torch.equal(out[:4], router)
    diff = out[4:].double() - router.double()
    assert abs(diff.std().item() / (0.01 * std) - 1) < 0.05


def test_router_and_bias_exact_for_antithetic_and_none():
    router, bias = src_tensor((4, 16)), torch.tensor([0.1, -0.2, 0.3, 0.0])
    for noise in ("antithetic", "none"):
        p = plan(noise=noise, expert_layout="interleave")
        assert torch.equal(grow_router(p, 1, router), router[[0, 0, 1, 1, 2, 2, 3, 3]])
        assert torch.equal(grow_expert_bias(p, 1, bias), bias[[0, 0, 1, 1, 2, 2, 3, 3]])


def test_expert_bias_modes():
    bias = torch.tensor([0.1, -0.2, 0.3, 0.05])
    g = grow_expert_bias(plan(noise="gaussian", alpha=0.1), 0, bias)
    assert torch.equal(g[:4], bias) and not torch.equal(g[4:], bias)
    # constant bias (fresh init): no noise at all
    zeros = torch.zeros(4)
    assert torch.equal(grow_expert_bias(plan(noise="gaussian"), 0, zeros), torch.zeros(8))
    assert torch.equal(grow_expert_bias(plan(zero_expert_bias=True), 0, bias), torch.zeros(8))
    r = grow_expert_bias(plan(new_experts="random"), 0, bias)
    assert torch.equal(r[:4], bias) and torch.equal(r[4:], torch.zeros(4))


def test_random_router_rows():
    p = plan(new_experts="random")
    router = src_tensor((4, 4096))
    out = grow_router(p, 0, router)
    assert torch.equal(out[:4], router)
    assert abs(out[4:].std().item() / SRC.init_method_std - 1) < 0.05


def test_noise_keyed_by_source_layer_when_width_first():
    d = DepthGrowthConfig(factor=2)
    src = src_tensor((16, 8))
    wf = plan(order=("width", "depth"), depth=d)
    df = plan(order=("depth", "width"), depth=d)
    # target layers 0 and 1 copy source layer 0
    assert torch.equal(grow_expert_tensor(wf, FC1_KEY, 0, 5, src, 0.05),
                       grow_expert_tensor(wf, FC1_KEY, 1, 5, src, 0.05))
    assert not torch.equal(grow_expert_tensor(df, FC1_KEY, 0, 5, src, 0.05),
                           grow_expert_tensor(df, FC1_KEY, 1, 5, src, 0.05))
    assert torch.equal(grow_router(wf, 0, src[:4]), grow_router(wf, 1, src[:4]))
    assert not torch.equal(grow_router(df, 0, src[:4]), grow_router(df, 1, src[:4]))


def test_identity_init_names_and_zeroing():
    for name in ["decoder.layers.3.self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
                 "mlp.experts.local_experts.7.linear_fc2.weight", "mlp.experts.linear_fc2.weight3",
                 "decoder.layers.mlp.experts.experts.linear_fc2.weight", "mlp.shared_experts.linear_fc2.weight",
                 FC2_KEY]:
        assert zeroed_by_identity_init(name), name
    for name in ["self_attention.linear_qkv.weight", "mlp.experts.local_experts.0.linear_fc1.weight",
                 "mlp.shared_experts.linear_fc1.weight", "mlp.router.weight", "input_layernorm.weight",
                 "self_attention.linear_proj._extra_state", FC1_KEY]:
        assert not zeroed_by_identity_init(name), name
    p = make_growth_plan(SRC, GrowthConfig(depth=DepthGrowthConfig(identity_init=True)))
    src = src_tensor((16, 8))
    assert torch.equal(grow_expert_tensor(p, FC2_KEY, 0, 1, src, 0.05), src)       # original layer
    assert torch.equal(grow_expert_tensor(p, FC2_KEY, 1, 1, src, 0.05), torch.zeros(16, 8))  # copy
    assert torch.equal(grow_expert_tensor(p, FC1_KEY, 1, 1, src, 0.05), src)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_moments_leave_their_input_alone_and_follow_the_definition(dtype):
    t = (src_tensor((40, 25)) * 3 + 1).to(dtype)
    before = t.clone()
    n, mean, m2 = tensor_moments(t)
    assert torch.equal(t, before)  # a float64 input is not worked on in place
    values = [float(v) for v in t.flatten().tolist()]
    exact_mean = math.fsum(values) / len(values)
    assert n == 1000
    assert math.isclose(mean, exact_mean, rel_tol=1e-12)
    assert math.isclose(m2, math.fsum((v - exact_mean) ** 2 for v in values), rel_tol=1e-12)
