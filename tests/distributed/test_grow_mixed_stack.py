"""Growth of a mixed dense/MoE stack with shared experts against the oracle written from the definitions.

The source is written by stock Megatron-Core calls (``GPTModel`` from a ``TransformerConfig`` with a
``moe_layer_freq`` pattern, MCore's ``get_gpt_decoder_block_spec`` through the project's local spec,
saved with ``dist_checkpointing.save`` on 2 gloo processes with Megatron-LM's ``args``, whose
``--moe-layer-freq "([0]*1+[1]*3)"``, ``--ffn-hidden-size`` and ``--moe-shared-expert-gate`` give the
architecture; no ``megatron_grow.json``): layer 0 dense (a
GLM-4.5 / DeepSeek ``first_k_dense_replace``), layers 1-3 MoE with a gated shared expert. MCore stores
such a stack one key per layer. The real sharded growth runs on 2 gloo processes into a different layout
and every stored tensor must equal ``oracle.expected_grown_per_layer`` bit for bit: depth copies a dense
layer as a dense layer, width duplicates routed experts only (shared experts and dense MLPs copied).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/distributed/test_grow_mixed_stack.py
"""

from __future__ import annotations

import argparse
import json
import os
import zlib

import pytest
import torch

from megatron_grow.config.schema import DepthGrowthConfig, GrowthConfig, ModelConfig, ParallelConfig, WidthGrowthConfig
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed import oracle
from tests.distributed.bodies import plain_tensors_of_many

pytestmark = pytest.mark.slow  # ~1 min on 2 shared cores: 1 stock save, 2 growths, 3 reads

PATTERN = (0, 1, 1, 1)
SOURCE_MODEL = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                           num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_layer_freq=PATTERN,
                           ffn_hidden_size=96, moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True,
                           vocab_size=256, seq_length=32)


def save_stock_mixed_source(tp: int, ep: int, root: str) -> None:
    """The mixed stack built and saved by stock MCore calls under TP=``tp``/EP=``ep``; expert e scaled by
    (1 + e/2), norms, expert bias and the shared-expert gate given distinct values per layer."""
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_grow.models.specs import decoder_block_spec
    from megatron_grow.platform import cpu

    cpu.apply_cpu_adaptations()
    torch.distributed.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    tensor_parallel.model_parallel_cuda_manual_seed(4321)
    m = SOURCE_MODEL
    config = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups, kv_channels=m.kv_channels, ffn_hidden_size=m.ffn_hidden_size,
        num_moe_experts=m.num_moe_experts, moe_router_topk=m.moe_router_topk, moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_layer_freq=list(PATTERN), moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=True, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3, moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall", qk_layernorm=True, normalization="RMSNorm", layernorm_epsilon=1e-6,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, init_method_std=m.init_method_std,
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, sequence_parallel=tp > 1,
        use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        moe_permute_fusion=False, moe_router_fusion=False)
    model = GPTModel(config=config, transformer_layer_spec=decoder_block_spec(config, use_te=False),
                     vocab_size=256, max_sequence_length=m.seq_length, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope")
    with torch.no_grad():
        for layer in model.decoder.layers:
            if not hasattr(layer.mlp, "router"):
                continue
            for k, expert in enumerate(layer.mlp.experts.local_experts):
                e = ps.get_expert_model_parallel_rank() * (m.num_moe_experts // ep) + k
                expert.linear_fc1.weight.mul_(1 + e / 2)
                expert.linear_fc2.weight.mul_(1 + e / 2)
            g = torch.Generator().manual_seed(100 + layer.layer_number)
            layer.mlp.router.expert_bias.copy_(torch.randn(m.num_moe_experts, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if "layernorm" in name or "gate_weight" in name:  # replicated over TP: the same values on every rank
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    ckpt = os.path.join(root, "iter_0000001")
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt)
    torch.distributed.barrier()
    state = {"model": model.sharded_state_dict(), "args": megatron_lm_args(tp, ep), "checkpoint_version": 3.0,
             "iteration": 1, "num_floating_point_operations_so_far": 0}
    dist_checkpointing.save(state, ckpt)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("1")


def megatron_lm_args(tp: int, ep: int) -> argparse.Namespace:
    """What Megatron-LM's pretrain_gpt.py stores for this model, --moe-layer-freq in its command-line form."""
    m = SOURCE_MODEL
    return argparse.Namespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, group_query_attention=True, num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels, num_experts=m.num_moe_experts, moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size, moe_layer_freq="([0]*1+[1]*3)",
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size, moe_shared_expert_gate=True,
        moe_shared_expert_overlap=True, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type=["aux_loss"], moe_aux_loss_coeff=[1e-3], moe_router_dtype="fp32",
        swiglu=True, normalization="RMSNorm", norm_epsilon=1e-6, qk_layernorm=True, add_bias_linear=False,
        add_qkv_bias=False, untie_embeddings_and_output_weights=True, position_embedding_type="rope",
        rotary_base=10000, rotary_percent=1.0, max_position_embeddings=m.seq_length, seq_length=m.seq_length,
        padded_vocab_size=256, vocab_size=None, init_method_std=m.init_method_std, multi_latent_attention=False,
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, iteration=1)


def grow_mixed(source_root: str, grown_root: str, growth: GrowthConfig, parallel: ParallelConfig):
    """The real offline growth (collective); the architecture is read from the source's Megatron-LM args."""
    from megatron_grow.growth.grow import grow_checkpoint

    return grow_checkpoint(source_root, grown_root, growth, parallel, progress=False)


CASES = {
    # depth first (noise keyed by the target layer), interposition with identity_init: the dense layer's
    # copy has its MLP fc2 zeroed like an MoE copy's fc2; gaussian per-expert noise; TP=2 source into EP=2.
    "depth_identity_then_width": dict(
        parallel=ParallelConfig(expert_model_parallel_size=2),
        growth=GrowthConfig(order=("depth", "width"), seed=11,
                            depth=DepthGrowthConfig(mode="interposition", factor=2, identity_init=True),
                            width=WidthGrowthConfig(factor=2, expert_layout="interleave", noise="gaussian",
                                                    alpha=0.05))),
    # width then stack x2 with ignore_first=1 (the dense layer appears once, at the bottom); into TP=2, ETP=1.
    "width_then_stack": dict(
        parallel=ParallelConfig(tensor_model_parallel_size=2, expert_tensor_parallel_size=1),
        growth=GrowthConfig(order=("width", "depth"), seed=5,
                            depth=DepthGrowthConfig(mode="stack", factor=2, ignore_first=1),
                            width=WidthGrowthConfig(factor=2, noise="gaussian", alpha=0.05,
                                                    noise_granularity="per_layer"))),
}


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    source = str(tmp_path_factory.mktemp("stock_mixed") / "ckpt")
    run_in_processes(save_stock_mixed_source, 2, (2, 1, source))
    roots = {}
    for case, c in CASES.items():
        roots[case] = str(tmp_path_factory.mktemp(case) / "grown")
        run_in_processes(grow_mixed, 2, (source, roots[case], c["growth"], c["parallel"]))
    tensors = run_in_processes(plain_tensors_of_many, 1, ([source] + [roots[c] for c in CASES],))[0]
    return {"source": tensors[0], "roots": roots, **dict(zip(CASES, tensors[1:]))}


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_stack_growth_equals_the_definition(grown, case):
    src, got = grown["source"], grown[case]
    expected = oracle.expected_grown_per_layer(src, CASES[case]["growth"], SOURCE_MODEL.init_method_std)
    assert sorted(got) == sorted(expected), case
    wrong = [k for k, v in expected.items() if got[k].shape != v.shape or not torch.equal(got[k], v)]
    assert not wrong, f"{case}: {wrong}"


def _pattern_of(tensors: dict) -> list[int]:
    layers = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("decoder.layers.")})
    return [int(f"decoder.layers.{i}.mlp.router.weight" in tensors) for i in layers]


def test_the_layer_pattern_follows_the_copies(grown):
    src = grown["source"]
    assert _pattern_of(src) == list(PATTERN)
    assert src["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 96, 64)      # the dense MLP
    assert src["decoder.layers.1.mlp.shared_experts.gate_weight"].shape == (1, 64)
    # interposition x2: [0, 0, 1, 1, 2, 2, 3, 3]; stack x2 with ignore_first=1: [0, 1, 2, 3, 1, 2, 3]
    for case, sources in (("depth_identity_then_width", [0, 0, 1, 1, 2, 2, 3, 3]),
                          ("width_then_stack", [0, 1, 2, 3, 1, 2, 3])):
        want = [PATTERN[s] for s in sources]
        assert _pattern_of(grown[case]) == want, case
        with open(os.path.join(grown["roots"][case], "iter_0000001", "megatron_grow.json")) as f:
            assert json.load(f)["model"]["moe_layer_freq"] == want, case


def test_width_leaves_shared_experts_and_dense_mlps_alone(grown):
    src, got = grown["source"], grown["width_then_stack"]
    for j, s in enumerate([0, 1, 2, 3, 1, 2, 3]):
        for name in ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight", "mlp.shared_experts.linear_fc1.weight",
                     "mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.gate_weight"):
            key = f"decoder.layers.{s}.{name}"
            if key in src:
                assert torch.equal(got[f"decoder.layers.{j}.{name}"], src[key]), (j, name)
        if PATTERN[s]:
            assert got[f"decoder.layers.{j}.mlp.experts.experts.linear_fc1.weight"].shape[0] == 8
    # identity_init zeroes the dense copy's fc2 as it does an MoE copy's
    depth_first = grown["depth_identity_then_width"]
    assert torch.count_nonzero(depth_first["decoder.layers.1.mlp.linear_fc2.weight"]) == 0
    dense_fc2 = "decoder.layers.0.mlp.linear_fc2.weight"
    assert torch.equal(depth_first[dense_fc2], src[dense_fc2])


