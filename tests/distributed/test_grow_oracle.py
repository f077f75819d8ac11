"""The sharded growth against an oracle written from the operators' definitions.

The sources are written by stock Megatron-Core calls -- ``GPTModel`` built under TP=2 or EP=2
on gloo, saved with ``dist_checkpointing.save`` into a Megatron-LM ``iter_0000001`` directory
with no ``megatron_grow.json`` -- not by our save. Every growth runs through the real sharded
path (``growth.grow.grow_checkpoint`` on 2 gloo processes) into a parallel layout different
from the source's, and every stored tensor of the result must equal, bit for bit,
``tests/distributed/oracle.expected_grown``: the index maps and the noise formula spelled out
in the test helpers from docs/growth.md, with no call into ``megatron_grow.growth``.

Options covered (each case combines several): interposition with ignore_first/last and
identity_init, stack with ignore_first and k=3, append and interleave expert layouts,
gaussian noise per_layer and per_expert, antithetic, zero_expert_bias, new_experts: random,
topk_factor 1, noise none, width-then-depth noise keying; sources TP=2 and EP=2; targets
PP=2 x VPP=3, TP=2 with ETP=1, EP=2 and TP=2 (experts TP-sliced).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/distributed/test_grow_oracle.py
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import pytest
import torch

from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import (
    DepthGrowthConfig,
    GrowthConfig,
    InsertGrowthConfig,
    ParallelConfig,
    UpcycleGrowthConfig,
    WidthGrowthConfig,
)
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed import oracle
from tests.distributed.bodies import plain_tensors_of_many

pytestmark = pytest.mark.slow  # ~4-10 min on 2 shared cores: 2 stock saves, 5 growths, 6 reads

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE_MODEL = dataclasses.replace(load_recipe(os.path.join(REPO, "configs/models/tiny.yaml")).model,
                                   seq_length=32)   # 4 layers, 8 experts, H 64, F 32, sigmoid + expert bias
# The same MoE with multi-latent attention (query latent 24, key/value latent 16, heads 8 + 8 RoPE wide, values
# 12) and grouped routing (4 groups of 2 experts, top-2 experts within the best 1 group), DeepSeek-V3 style.
MLA_FIELDS = dict(multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=8,
                  v_head_dim=12, moe_router_num_groups=4, moe_router_group_topk=1)
MLA_SOURCE_MODEL = dataclasses.replace(SOURCE_MODEL, **MLA_FIELDS)


# ------------------------------------------------------------------------------------------------
# A source written by stock Megatron-Core (runs in gloo processes)


def save_stock_source(tp: int, ep: int, root: str, mla: bool = False) -> None:
    """Build the tiny MoE as a Megatron-Core GPTModel under TP=``tp``/EP=``ep`` and save it with
    ``dist_checkpointing.save`` into ``root/iter_0000001`` plus Megatron-LM's tracker file.
    ``mla``: with multi-latent attention and grouped routing (``MLATransformerConfig``, MCore's local MLA spec).

    After MCore's init, expert e's weights are scaled by (1 + e/2) (so per-expert and per-layer
    stds differ), and the norms and the expert bias get distinct values per layer (so a layer
    copied from the wrong source layer, or a bias left constant, shows).
    """
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    from megatron_grow.models.specs import decoder_block_spec
    from megatron_grow.platform import cpu

    cpu.apply_cpu_adaptations()  # MCore on CPU/gloo (the project's one place for that)
    torch.distributed.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    tensor_parallel.model_parallel_cuda_manual_seed(4321)
    m = MLA_SOURCE_MODEL if mla else SOURCE_MODEL
    # MCore's local core attention sizes its output by kv_channels heads: the value heads under MLA.
    heads = dict(kv_channels=m.v_head_dim, num_query_groups=m.num_attention_heads) if mla else \
        dict(kv_channels=m.kv_channels, num_query_groups=m.num_query_groups)
    config = (MLATransformerConfig if mla else TransformerConfig)(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        **heads, ffn_hidden_size=m.moe_ffn_hidden_size,
        num_moe_experts=m.num_moe_experts, moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size, moe_layer_freq=1, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3,
        moe_router_dtype="fp32", moe_token_dispatcher_type="alltoall", qk_layernorm=True, normalization="RMSNorm",
        layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        init_method_std=m.init_method_std, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        sequence_parallel=tp > 1, use_cpu_initialization=True, bias_activation_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, moe_permute_fusion=False, moe_router_fusion=False,
        **(dict(MLA_FIELDS, rope_type="rope") if mla else {}))
    # MCore's local spec; its WrappedTorchNorm refuses sequence parallelism (needed for MoE with TP>1),
    # so the norms are the project's plain RMSNorm module (same parameter names and shapes).
    model = GPTModel(config=config, transformer_layer_spec=decoder_block_spec(config, use_te=False),
                     vocab_size=256, max_sequence_length=m.seq_length, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope")
    with torch.no_grad():
        experts_per_rank = m.num_moe_experts // ep
        for layer in model.decoder.layers:
            for k, expert in enumerate(layer.mlp.experts.local_experts):
                e = ps.get_expert_model_parallel_rank() * experts_per_rank + k
                expert.linear_fc1.weight.mul_(1 + e / 2)
                expert.linear_fc2.weight.mul_(1 + e / 2)
            g = torch.Generator().manual_seed(100 + layer.layer_number)
            layer.mlp.router.expert_bias.copy_(torch.randn(m.num_moe_experts, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if "layernorm" in name:  # replicated over TP: the same values on every rank
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    ckpt = os.path.join(root, "iter_0000001")
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("1")


def grow_stock_source(source_root: str, grown_root: str, growth: GrowthConfig, parallel: ParallelConfig,
                      source_model=SOURCE_MODEL):
    """The real offline growth (collective); the stock source records no architecture, so it is given."""
    from megatron_grow.growth.grow import grow_checkpoint

    return grow_checkpoint(source_root, grown_root, growth, parallel, source_model=source_model, progress=False)


# ------------------------------------------------------------------------------------------------
# Cases


def _growth(order, depth=None, width=None, seed=1234, upcycle=None, insert=None):
    return GrowthConfig(order=tuple(order), depth=DepthGrowthConfig(**depth) if depth else None,
                        width=WidthGrowthConfig(**width) if width else None, seed=seed,
                        upcycle=UpcycleGrowthConfig(**upcycle) if upcycle else None,
                        insert=InsertGrowthConfig(**insert) if insert else None)


# Routing shares of the 8 source experts (as route-stats would average them): q = 2 * u / sum(u) for
# E' = 10 is (.08, .8, .16, .04, .48, .16, .16, .12) -> floors 0; the 2 copies go to e1 (.8) and e4 (.48).
UTILITY = (0.04, 0.4, 0.08, 0.02, 0.24, 0.08, 0.08, 0.06)

# Per-layer utility of the 4 source layers (each layer allocated on its own, docs/growth.md), E' = 10 (n = 2):
# layer 0: UTILITY -> copies of e1, e4; layer 1: q = 2u/9 = 10/9, 0.., 2/9, 6/9 -> e0 (floor 1), then e7 (6/9);
# layer 2: all zero counts as uniform -> e0, e1; layer 3: q = 1 for e6 and e7 -> e6, e7.
# (Averaged over the layers every layer would copy the same two experts.)
PER_LAYER_UTILITY = (UTILITY, (5, 0, 0, 0, 0, 0, 1, 3), (0,) * 8, (0, 0, 0, 0, 0, 0, 2, 2))
PER_LAYER_COPIED = ([1, 4], [0, 7], [0, 1], [6, 7])  # append: targets 8, 9 of a layer reading source layer l


CASES = {
    # width then depth (noise keyed by the source layer, so depth copies carry identical noise),
    # interposition with ignores and identity_init, gaussian per-layer std; into PP=2 x VPP=3.
    "width_then_depth_identity_per_layer": dict(
        source="ep2", world=2,
        parallel=ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3),
        growth=_growth(("width", "depth"),
                       depth=dict(mode="interposition", factor=2, ignore_first=1, ignore_last=1, identity_init=True),
                       width=dict(factor=2, expert_layout="append", noise="gaussian", alpha=0.05,
                                  noise_granularity="per_layer"))),
    # stack k=3 with ignore_first, interleave, antithetic, zero_expert_bias; TP=2 source into TP=2, ETP=1.
    "stack_interleave_antithetic_zero_bias": dict(
        source="tp2", world=2,
        parallel=ParallelConfig(tensor_model_parallel_size=2, expert_tensor_parallel_size=1),
        growth=_growth(("depth", "width"), depth=dict(mode="stack", factor=3, ignore_first=1),
                       width=dict(factor=2, expert_layout="interleave", noise="antithetic", alpha=0.05,
                                  zero_expert_bias=True))),
    # the new_experts: random ablation, m=3, top-k unchanged; TP=2 source into EP=2.
    "random_new_experts": dict(
        source="tp2", world=2, parallel=ParallelConfig(expert_model_parallel_size=2),
        growth=_growth(("width",), width=dict(factor=3, topk_factor=1, new_experts="random"), seed=99)),
    # depth then width (noise keyed by the target layer), gaussian per-expert std, interleave;
    # EP=2 source into TP=2 (expert tensors TP-sliced: the noise is drawn whole, then sliced).
    "depth_then_width_per_expert": dict(
        source="ep2", world=2, parallel=ParallelConfig(tensor_model_parallel_size=2),
        growth=_growth(("depth", "width"), depth=dict(mode="interposition", factor=2),
                       width=dict(factor=2, expert_layout="interleave", noise="gaussian", alpha=0.05))),
    # stack with ignore_last and identity_init (7 layers), exact copies (noise none); TP=2 source into EP=2.
    "stack_identity_noise_none": dict(
        source="tp2", world=2, parallel=ParallelConfig(expert_model_parallel_size=2),
        growth=_growth(("depth", "width"),
                       depth=dict(mode="stack", factor=2, ignore_last=1, identity_init=True),
                       width=dict(factor=2, expert_layout="append", noise="none"))),
    # expert upcycling by utility, 8 -> 10 experts, top-k fixed, copies' expert bias noised; TP=2 source into EP=2.
    "upcycle_utility": dict(
        source="tp2", world=2, parallel=ParallelConfig(expert_model_parallel_size=2),
        growth=_growth(("upcycle",), upcycle=dict(num_experts=10, utility_shares=UTILITY, bias_noise=0.05), seed=7)),
    # upcycling uniform 8 -> 11, interleave, copies unselected, then depth (bias noise keyed by the source
    # layer); EP=2 into TP=2.
    "upcycle_uniform_then_depth": dict(
        source="ep2", world=2, parallel=ParallelConfig(tensor_model_parallel_size=2),
        growth=_growth(("upcycle", "depth"), depth=dict(mode="interposition", factor=2),
                       upcycle=dict(num_experts=11, allocation="uniform", expert_layout="interleave",
                                    bias_noise=0.1, unselected_copies=True))),
    # upcycling by per-layer utility (each layer its own copies), then stack x2 (each copy carries its source
    # layer's map and bias noise); TP=2 source into EP=2.
    "upcycle_per_layer_then_depth": dict(
        source="tp2", world=2, parallel=ParallelConfig(expert_model_parallel_size=2),
        growth=_growth(("upcycle", "depth"), depth=dict(mode="stack", factor=2),
                       upcycle=dict(num_experts=10, utility_shares=PER_LAYER_UTILITY, bias_noise=0.05), seed=5)),
    # interposition x2, then upcycling by per-layer utility (a depth copy of layer l is allocated by l's
    # shares; bias noise keyed by the target layer); EP=2 source into TP=2.
    "depth_then_upcycle_per_layer": dict(
        source="ep2", world=2, parallel=ParallelConfig(tensor_model_parallel_size=2),
        growth=_growth(("depth", "upcycle"), depth=dict(mode="interposition", factor=2),
                       upcycle=dict(num_experts=10, utility_shares=PER_LAYER_UTILITY, bias_noise=0.05), seed=5)),
    # depth by insertion (LLaMA Pro), 3 blocks (after layers 0, 2, 2: 4 -> 7), then width with gaussian
    # noise (keyed by the layer after insertion; the inserted blocks' fc2 zeroed after the noise); TP=2
    # source into EP=2.
    "insert_after_then_width": dict(
        source="tp2", world=2, parallel=ParallelConfig(expert_model_parallel_size=2),
        growth=_growth(("insert", "width"), insert=dict(after=(0, 2, 2)),
                       width=dict(factor=2, expert_layout="append", noise="gaussian", alpha=0.05))),
    # depth x2 then one block after every 4th layer (8 -> 10); EP=2 source into PP=2.
    "depth_then_insert_every": dict(
        source="ep2", world=2, parallel=ParallelConfig(pipeline_model_parallel_size=2),
        growth=_growth(("depth", "insert"), depth=dict(mode="interposition", factor=2), insert=dict(every=4))),
    # depth by insertion alone (4 -> 7: every 2nd layer, i.e. after 1 and 3, is the every-k case; here
    # after 0, 0 and 3); EP=2 source into TP=2. Also checked to compute the source function exactly.
    "insert_only": dict(
        source="ep2", world=2, parallel=ParallelConfig(tensor_model_parallel_size=2),
        growth=_growth(("insert",), insert=dict(after=(3, 0, 0)))),
    # multi-latent attention and grouped routing: interposition, then width with copy groups (append);
    # TP=2 source into TP=2 with ETP=1 (the latent projections TP-sharded on both sides).
    "mla_grouped_depth_then_width": dict(
        source="mla_tp2", world=2, model=MLA_SOURCE_MODEL,
        parallel=ParallelConfig(tensor_model_parallel_size=2, expert_tensor_parallel_size=1),
        growth=_growth(("depth", "width"), depth=dict(mode="interposition", factor=2, identity_init=True),
                       width=dict(factor=2, expert_layout="append", noise="gaussian", alpha=0.05))),
}

SOURCES = {"tp2": (2, 1, False), "ep2": (1, 2, False), "mla_tp2": (2, 1, True)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Plain tensors by name: the two stock sources at once, each grown case on first use (so one
    selected test grows only its own case). Reads run in a fresh 1-process group."""
    roots = {}
    for name, (tp, ep, mla) in SOURCES.items():
        roots[name] = str(tmp_path_factory.mktemp(f"stock_{name}") / "ckpt")
        run_in_processes(save_stock_source, tp * ep, (tp, ep, roots[name], mla))
    loaded = dict(zip(SOURCES, run_in_processes(plain_tensors_of_many, 1, ([roots[n] for n in SOURCES],))[0]))

    class Lazy(dict):
        def __missing__(self, case):
            c = CASES[case]
            root = str(tmp_path_factory.mktemp(case) / "grown")
            run_in_processes(grow_stock_source, c["world"], (roots[c["source"]], root, c["growth"], c["parallel"],
                                                             c.get("model", SOURCE_MODEL)))
            self.roots[case] = root
            self[case] = run_in_processes(plain_tensors_of_many, 1, ([root],))[0][0]
            return self[case]

    lazy = Lazy(loaded)
    lazy.roots = dict(roots)
    return lazy


def _expert_key(tensors: dict, name: str) -> str:
    return next(k for k in tensors if ".mlp.experts.experts." in k and k.endswith(name))


def _key(tensors: dict, suffix: str) -> str:
    return next(k for k in tensors if k.endswith(suffix))


def test_stock_sources_are_megatron_core_checkpoints(checkpoints):
    for name in SOURCES:
        src = checkpoints[name]
        assert src[_expert_key(src, "linear_fc1.weight")].shape == (4, 8, 64, 64)
        assert src[_expert_key(src, "linear_fc2.weight")].shape == (4, 8, 64, 32)
        assert src[_key(src, "mlp.router.expert_bias")].abs().min() > 0  # not the constant init
    # The two sources were initialised in different layouts: different tensors.
    a, b = checkpoints["tp2"], checkpoints["ep2"]
    assert not torch.equal(a[_key(a, "linear_qkv.weight")], b[_key(b, "linear_qkv.weight")])


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_growth_equals_the_definition(checkpoints, case):
    c = CASES[case]
    src, grown = checkpoints[c["source"]], checkpoints[case]
    expected = oracle.expected_grown(src, c["growth"], SOURCE_MODEL.init_method_std)
    assert sorted(grown) == sorted(expected), case
    wrong = []
    for key, value in expected.items():
        got = grown[key]
        if got.shape != value.shape:
            wrong.append(f"{key}: shape {tuple(got.shape)}, expected {tuple(value.shape)}")
        elif not torch.equal(got, value):
            diff = (got.double() - value.double()).abs()
            where = tuple(int(i) for i in (diff == diff.max()).nonzero()[0].tolist())
            wrong.append(f"{key}: {int((diff > 0).sum())} elements differ, max {diff.max().item():.3e} at {where}")
    assert not wrong, f"{case}:\n  " + "\n  ".join(wrong)


# ------------------------------------------------------------------------------------------------
# What each case's definition implies, checked on the grown tensors directly (so the oracle's own
# reading of the definitions is checked too)


def test_width_then_depth_properties(checkpoints):
    src, grown = checkpoints["ep2"], checkpoints["width_then_depth_identity_per_layer"]
    # layers [0, 1, 1, 2, 2, 3]: the first and last appear once; copies at target 2 and 4.
    fc1, fc2, proj = (_expert_key(grown, "linear_fc1.weight"), _expert_key(grown, "linear_fc2.weight"),
                      _key(grown, "self_attention.linear_proj.weight"))
    norm = _key(grown, "linear_qkv.layer_norm_weight")  # the input norm, as MCore stores it
    assert grown[fc1].shape[:2] == (6, 16)
    for j, s in enumerate([0, 1, 1, 2, 2, 3]):
        assert torch.equal(grown[norm][j], src[norm][s]), j
        assert torch.equal(grown[fc1][j, :8], src[fc1][s]), j    # append: originals first, exact
        new = j in (2, 4)
        assert torch.equal(grown[proj][j], torch.zeros_like(grown[proj][j]) if new else src[proj][s]), j
        assert bool(grown[fc2][j].abs().max() == 0) == new, j  # identity_init zeroes every fc2 of a copy
    # Width first: both depth copies of source layer 1 carry the same noised fc1.
    assert torch.equal(grown[fc1][1], grown[fc1][2]) and torch.equal(grown[fc1][3], grown[fc1][4])
    # per_layer: every copy's noise has the std of the whole layer's fc1 times alpha, not its own expert's.
    layer_std = src[fc1][1].double().std().item()
    for e in (0, 7):
        delta = grown[fc1][1, 8 + e] - src[fc1][1, e]
        assert abs(oracle.noise_std_ratio(delta, 0.05 * layer_std) - 1) < 0.05, e


def test_antithetic_zero_bias_properties(checkpoints):
    src, grown = checkpoints["tp2"], checkpoints["stack_interleave_antithetic_zero_bias"]
    fc1, fc2 = _expert_key(grown, "linear_fc1.weight"), _expert_key(grown, "linear_fc2.weight")
    router, bias = _key(grown, "mlp.router.weight"), _key(grown, "mlp.router.expert_bias")
    stack = [0, 1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert grown[fc1].shape[:2] == (10, 16)
    assert torch.count_nonzero(grown[bias]) == 0
    for j, s in enumerate(stack):
        assert torch.equal(grown[router][j], src[router][s].repeat_interleave(2, dim=0)), j
        assert torch.equal(grown[fc1][j], src[fc1][s].repeat_interleave(2, dim=0)), j
        pair_sum = grown[fc2][j, 0::2].double() + grown[fc2][j, 1::2].double()
        torch.testing.assert_close(pair_sum, 2 * src[fc2][s].double(), atol=1e-6, rtol=0)  # zero-sum noise
        assert not torch.equal(grown[fc2][j, 0], src[fc2][s, 0]), j   # the original moves too
    # depth first: the three copies of source layer 1 get different noise
    assert not torch.equal(grown[fc2][1], grown[fc2][4]) and not torch.equal(grown[fc2][4], grown[fc2][7])


def test_random_new_experts_properties(checkpoints):
    src, grown = checkpoints["tp2"], checkpoints["random_new_experts"]
    std = SOURCE_MODEL.init_method_std
    for key in (_expert_key(grown, "linear_fc1.weight"), _expert_key(grown, "linear_fc2.weight"),
                _key(grown, "mlp.router.weight")):
        assert grown[key].shape[1] == 24, key
        assert torch.equal(grown[key][:, :8], src[key]), f"{key}: originals must stay exact"
        fresh = grown[key][:, 8:]
        for c in range(2):  # each new copy differs from the expert it would have copied
            assert not torch.equal(fresh[:, 8 * c:8 * (c + 1)], src[key]), key
        assert not torch.equal(fresh[:, :8], fresh[:, 8:]), key
        assert abs(fresh.double().std().item() / std - 1) < 0.05, key     # N(0, init_method_std^2)
        assert abs(fresh.double().mean().item()) < 0.05 * std, key
    bias = _key(grown, "mlp.router.expert_bias")
    assert torch.equal(grown[bias][:, :8], src[bias]) and torch.count_nonzero(grown[bias][:, 8:]) == 0


def test_depth_then_width_properties(checkpoints):
    src, grown = checkpoints["ep2"], checkpoints["depth_then_width_per_expert"]
    fc2, router = _expert_key(grown, "linear_fc2.weight"), _key(grown, "mlp.router.weight")
    bias = _key(grown, "mlp.router.expert_bias")
    for j in range(8):
        s = j // 2
        assert torch.equal(grown[fc2][j, 0::2], src[fc2][s]), j     # interleave: originals at even slots
        assert torch.equal(grown[router][j, 0::2], src[router][s]), j
        assert torch.equal(grown[bias][j, 0::2], src[bias][s]), j
        assert not torch.equal(grown[bias][j, 1::2], src[bias][s]), j   # the bias is noised too
    # per_expert: each copy's noise has its own expert's std (experts were scaled by 1 + e/2).
    for e in (0, 7):
        delta = grown[fc2][0, 2 * e + 1] - src[fc2][0, e]
        ratio = oracle.noise_std_ratio(delta, 0.05 * src[fc2][0, e].double().std().item())
        assert abs(ratio - 1) < 0.1, (e, ratio)
    # depth first: the two copies of one source layer get different noise
    assert not torch.equal(grown[fc2][0, 1], grown[fc2][1, 1])


def test_stack_identity_noise_none_properties(checkpoints):
    src, grown = checkpoints["tp2"], checkpoints["stack_identity_noise_none"]
    fc2, proj = _expert_key(grown, "linear_fc2.weight"), _key(grown, "self_attention.linear_proj.weight")
    qkv = _key(grown, "linear_qkv.weight")
    # stack k=2 with ignore_last=1 on 4 layers: [0, 1, 2] then [0, 1, 2, 3]; the last layer appears once.
    stack = [0, 1, 2, 0, 1, 2, 3]
    assert grown[qkv].shape[0] == 7
    for j, s in enumerate(stack):
        new = j in (3, 4, 5)
        assert torch.equal(grown[qkv][j], src[qkv][s]), j
        assert torch.equal(grown[proj][j], torch.zeros_like(src[proj][s]) if new else src[proj][s]), j
        expected_fc2 = torch.zeros_like(grown[fc2][j]) if new else torch.cat([src[fc2][s], src[fc2][s]])
        assert torch.equal(grown[fc2][j], expected_fc2), j


def test_upcycle_utility_properties(checkpoints):
    src, grown = checkpoints["tp2"], checkpoints["upcycle_utility"]
    fc1, bias = _expert_key(grown, "linear_fc1.weight"), _key(grown, "mlp.router.expert_bias")
    router = _key(grown, "mlp.router.weight")
    assert grown[fc1].shape[:2] == (4, 10)
    assert torch.equal(grown[fc1][:, :8], src[fc1]) and torch.equal(grown[router][:, :8], src[router])
    # the two most used experts (1 and 4) are the ones copied, exactly, router rows included
    assert torch.equal(grown[fc1][:, 8], src[fc1][:, 1]) and torch.equal(grown[fc1][:, 9], src[fc1][:, 4])
    assert torch.equal(grown[router][:, 8:], src[router][:, [1, 4]])
    assert torch.equal(grown[bias][:, :8], src[bias])
    assert not torch.equal(grown[bias][:, 8:], src[bias][:, [1, 4]])   # copies perturbed through the bias only


def test_upcycle_uniform_then_depth_properties(checkpoints):
    src, grown = checkpoints["ep2"], checkpoints["upcycle_uniform_then_depth"]
    fc2, bias = _expert_key(grown, "linear_fc2.weight"), _key(grown, "mlp.router.expert_bias")
    # uniform 8 -> 11: experts 0, 1, 2 get one copy each; interleave: [0, 0', 1, 1', 2, 2', 3, ..., 7]
    order = [0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7]
    assert grown[fc2].shape[:2] == (8, 11)
    for j in range(8):
        assert torch.equal(grown[fc2][j], src[fc2][j // 2][order]), j
    # upcycling first: both depth copies of a layer carry the same bias noise
    assert torch.equal(grown[bias][0], grown[bias][1])
    # unselected copies: below every source bias by 2 or more; originals exact
    for j in range(8):
        assert torch.equal(grown[bias][j, [0, 2, 4, 6, 7, 8, 9, 10]], src[bias][j // 2]), j
        assert (grown[bias][j, [1, 3, 5]] <= src[bias][j // 2].min() - 2).all(), j


@pytest.mark.parametrize("case, source, layer_source", [
    ("upcycle_per_layer_then_depth", "tp2", [0, 1, 2, 3, 0, 1, 2, 3]),
    ("depth_then_upcycle_per_layer", "ep2", [0, 0, 1, 1, 2, 2, 3, 3]),
])
def test_upcycle_per_layer_properties(checkpoints, case, source, layer_source):
    src, grown = checkpoints[source], checkpoints[case]
    fc1, router = _expert_key(grown, "linear_fc1.weight"), _key(grown, "mlp.router.weight")
    bias = _key(grown, "mlp.router.expert_bias")
    assert grown[fc1].shape[:2] == (8, 10)
    for j, ls in enumerate(layer_source):
        copied = PER_LAYER_COPIED[ls]  # hand-worked from each source layer's own shares
        assert torch.equal(grown[fc1][j], src[fc1][ls][list(range(8)) + copied]), j
        assert torch.equal(grown[router][j], src[router][ls][list(range(8)) + copied]), j
        assert torch.equal(grown[bias][j, :8], src[bias][ls]), j
    # upcycling first: the stack copies of a layer carry the same bias noise; depth first: each its own
    assert torch.equal(grown[bias][0], grown[bias][4]) == (case == "upcycle_per_layer_then_depth")


def test_insert_properties(checkpoints):
    src, grown = checkpoints["tp2"], checkpoints["insert_after_then_width"]
    proj, qkv = _key(grown, "self_attention.linear_proj.weight"), _key(grown, "linear_qkv.weight")
    fc1, fc2 = _expert_key(grown, "linear_fc1.weight"), _expert_key(grown, "linear_fc2.weight")
    # after layers 0, 2, 2: [0, 0*, 1, 2, 2*, 2*, 3]; a new block copies the layer before it.
    for j, (s, new) in enumerate([(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 1), (3, 0)]):
        assert torch.equal(grown[qkv][j], src[qkv][s]), j
        assert torch.equal(grown[fc1][j, :8], src[fc1][s]), j
        assert torch.equal(grown[proj][j], torch.zeros_like(src[proj][s]) if new else src[proj][s]), j
        assert bool(grown[fc2][j].abs().max() == 0) == bool(new), j
    # width after insertion keys its noise by the layer after insertion: the two new blocks after layer 2 differ.
    assert not torch.equal(grown[fc1][4, 8:], grown[fc1][5, 8:])


def _verify(source_root: str, grown_root: str, parallel: ParallelConfig) -> dict:
    from megatron_grow.growth.verify import verify_growth

    return verify_growth(source_root, grown_root, parallel, source_model=SOURCE_MODEL)


def test_insert_preserves_the_function_exactly(checkpoints):
    checkpoints["insert_only"]  # grown on first use
    metrics = run_in_processes(_verify, 2, (checkpoints.roots["ep2"], checkpoints.roots["insert_only"],
                                            ParallelConfig(tensor_model_parallel_size=2)))[0]
    assert metrics["tokens"] > 0
    assert metrics["max_abs_logit_diff"] == 0.0 and metrics["top1_agreement"] == 1.0, metrics
