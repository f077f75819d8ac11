"""Plain-tensor growth on a real tiny Megatron-Core model (local spec, one gloo process).

Checks that the oracle moves tensors where the index maps say, and that width growth is
function-preserving with exact or antithetic copies under sigmoid top-k routing with an
expert bias (docs/paper.md §2.2): the grown model's logits equal the source's.
"""

import dataclasses

import pytest
import torch

from megatron_grow.config.schema import (
    DepthGrowthConfig,
    GrowthConfig,
    ModelConfig,
    ParallelConfig,
    WidthGrowthConfig,
)
from megatron_grow.errors import GrowthError
from megatron_grow.growth.plan import make_growth_plan
from megatron_grow.growth.reference import grow_state_dict

SRC = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                  num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                  moe_shared_expert_intermediate_size=16, moe_router_score_function="sigmoid",
                  moe_router_enable_expert_bias=True, vocab_size=256, seq_length=32)
SEQ = 24


@pytest.fixture(scope="module")
def dist():
    from megatron_grow.parallel.init import initialize_distributed

    # torch.distributed can be initialised once per process; initialize_distributed reuses it
    return initialize_distributed(ParallelConfig())


def build(model_cfg):
    from megatron_grow.models.builder import build_gpt_model

    m = build_gpt_model(model_cfg)
    m.eval()
    return m


@pytest.fixture(scope="module")
def source(dist):
    torch.manual_seed(0)
    model = build(SRC)
    sd = model.state_dict()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, value in sd.items():
            if key.endswith("expert_bias"):
                # a trained, non-constant aux-loss-free bias, so routing depends on it
                value.copy_(torch.randn(value.shape, generator=g) * 0.05)
            elif key.endswith("layernorm.weight"):
                value.copy_(1 + 0.1 * torch.randn(value.shape, generator=g))
    tokens = torch.randint(0, SRC.vocab_size, (2, SEQ), generator=g)
    return model, {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}, tokens


def forward(model, tokens):
    s = tokens.shape[1]
    position_ids = torch.arange(s).unsqueeze(0).expand_as(tokens)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)  # True = masked
    with torch.no_grad():
        return model(tokens, position_ids, mask)


def grown_logits(plan, source_sd, tokens):
    target = build(plan.target)
    target.load_state_dict(grow_state_dict(source_sd, plan), strict=True)
    return forward(target, tokens)


def tensors(sd):
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def layer_key(i, rest):
    return f"decoder.layers.{i}.{rest}"


def test_depth_interposition_copies_layers(source):
    _, sd, _ = source
    plan = make_growth_plan(SRC, GrowthConfig(depth=DepthGrowthConfig(mode="interposition", factor=2)))
    out = grow_state_dict(sd, plan)
    n_src = sum(1 for k in sd if k.startswith("decoder.layers.0."))
    for j in range(4):
        keys = [k for k in out if k.startswith(f"decoder.layers.{j}.")]
        assert len(keys) == n_src
        for k in keys:
            src_key = k.replace(f"decoder.layers.{j}.", f"decoder.layers.{j // 2}.", 1)
            if isinstance(out[k], torch.Tensor):
                assert torch.equal(out[k], sd[src_key]), k
    for k in ("embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"):
        assert torch.equal(out[k], sd[k])
    assert set(out) == set(build(plan.target).state_dict())


def test_depth_stack_copies_layers(source):
    _, sd, _ = source
    plan = make_growth_plan(SRC, GrowthConfig(depth=DepthGrowthConfig(mode="stack", factor=3)))
    out = grow_state_dict(sd, plan)
    for j in range(6):
        k = layer_key(j, "self_attention.linear_qkv.weight")
        assert torch.equal(out[k], sd[layer_key(j % 2, "self_attention.linear_qkv.weight")])


@pytest.mark.parametrize("layout", ["append", "interleave"])
def test_width_none_copies_experts(source, layout):
    _, sd, _ = source
    plan = make_growth_plan(SRC, GrowthConfig(width=WidthGrowthConfig(noise="none", expert_layout=layout)))
    out = grow_state_dict(sd, plan)
    E = SRC.num_moe_experts
    for i in range(2):
        for e in range(2 * E):
            s = e % E if layout == "append" else e // 2
            for w in ("linear_fc1.weight", "linear_fc2.weight"):
                assert torch.equal(out[layer_key(i, f"mlp.experts.local_experts.{e}.{w}")],
                                   sd[layer_key(i, f"mlp.experts.local_experts.{s}.{w}")])
        for rest in ("mlp.shared_experts.linear_fc1.weight", "self_attention.linear_qkv.weight"):
            assert torch.equal(out[layer_key(i, rest)], sd[layer_key(i, rest)])
        assert out[layer_key(i, "mlp.router.weight")].shape == (2 * E, SRC.hidden_size)


def test_gaussian_only_copies_change(source):
    _, sd, _ = source
    plan = make_growth_plan(SRC, GrowthConfig(width=WidthGrowthConfig(noise="gaussian", alpha=0.01)))
    out = grow_state_dict(sd, plan)
    E = SRC.num_moe_experts
    for e in range(2 * E):
        k = layer_key(1, f"mlp.experts.local_experts.{e}.linear_fc1.weight")
        src = sd[layer_key(1, f"mlp.experts.local_experts.{e % E}.linear_fc1.weight")]
        assert torch.equal(out[k], src) == (e < E)
    router = out[layer_key(1, "mlp.router.weight")]
    assert torch.equal(router[:E], sd[layer_key(1, "mlp.router.weight")])
    assert not torch.equal(router[E:], sd[layer_key(1, "mlp.router.weight")])


def test_per_layer_std_uses_all_experts(source):
    _, sd, _ = source
    base = dict(noise="gaussian", alpha=0.5)
    per_e = grow_state_dict(sd, make_growth_plan(SRC, GrowthConfig(width=WidthGrowthConfig(**base))))
    per_l = grow_state_dict(sd, make_growth_plan(SRC, GrowthConfig(
        width=WidthGrowthConfig(noise_granularity="per_layer", **base))))
    k = layer_key(0, "mlp.experts.local_experts.5.linear_fc2.weight")
    src = sd[layer_key(0, "mlp.experts.local_experts.1.linear_fc2.weight")]
    all_fc2 = torch.cat([sd[layer_key(0, f"mlp.experts.local_experts.{e}.linear_fc2.weight")].flatten()
                         for e in range(4)])
    # same generator, different scale: noise ratio equals the std ratio
    ratio = ((per_l[k] - src).norm() / (per_e[k] - src).norm()).item()
    assert ratio == pytest.approx(all_fc2.std().item() / src.std().item(), rel=1e-4)


def test_source_mismatch_is_growth_error(source):
    _, sd, _ = source
    plan = make_growth_plan(dataclasses.replace(SRC, num_layers=3), GrowthConfig(depth=DepthGrowthConfig()))
    with pytest.raises(GrowthError):
        grow_state_dict(sd, plan)


# ------------------------------------------------------------------------------------------------
# Function preservation


@pytest.mark.parametrize("noise,layout", [("none", "append"), ("antithetic", "append"),
                                          ("antithetic", "interleave")])
def test_width_growth_preserves_function(source, noise, layout):
    model, sd, tokens = source
    ref = forward(model, tokens)
    plan = make_growth_plan(SRC, GrowthConfig(width=WidthGrowthConfig(noise=noise, alpha=0.01,
                                                                      expert_layout=layout)))
    assert plan.target.moe_router_topk == 4
    out = grown_logits(plan, sd, tokens)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_gaussian_width_growth_changes_function_slightly(source):
    # the check above can fail: gaussian noise on router and copies moves the logits
    model, sd, tokens = source
    ref = forward(model, tokens)
    plan = make_growth_plan(SRC, GrowthConfig(width=WidthGrowthConfig(noise="gaussian", alpha=0.01)))
    diff = (grown_logits(plan, sd, tokens) - ref).abs().max().item()
    assert 1e-5 < diff < 0.1 * ref.abs().max().item()


def test_width_without_topk_growth_changes_function(source):
    model, sd, tokens = source
    ref = forward(model, tokens)
    plan = make_growth_plan(SRC, GrowthConfig(width=WidthGrowthConfig(noise="none", topk_factor=1)))
    assert (grown_logits(plan, sd, tokens) - ref).abs().max().item() > 1e-4


def test_identity_init_depth_growth_preserves_function(source):
    model, sd, tokens = source
    ref = forward(model, tokens)
    plan = make_growth_plan(SRC, GrowthConfig(
        order=("depth", "width"), depth=DepthGrowthConfig(factor=2, identity_init=True),
        width=WidthGrowthConfig(noise="antithetic")))
    grown = grow_state_dict(sd, plan)
    assert torch.count_nonzero(grown[layer_key(1, "self_attention.linear_proj.weight")]) == 0
    assert torch.count_nonzero(grown[layer_key(1, "mlp.shared_experts.linear_fc2.weight")]) == 0
    assert torch.count_nonzero(grown[layer_key(0, "self_attention.linear_proj.weight")]) > 0
    torch.testing.assert_close(grown_logits(plan, sd, tokens), ref, rtol=0, atol=1e-5)
    plain = make_growth_plan(SRC, GrowthConfig(depth=DepthGrowthConfig(factor=2)))
    assert (grown_logits(plain, sd, tokens) - ref).abs().max().item() > 1e-3
