"""Recycling checkpoints written by Megatron-LM, whichever layer spec wrote them.

The sources are written here with stock Megatron-Core calls only, the way Megatron-LM's
``pretrain_gpt.py`` writes them: a ``TransformerConfig``, ``GPTModel`` with MCore's own
``get_gpt_layer_local_spec``, ``model.sharded_state_dict()``, ``dist_checkpointing.save``, an
``argparse.Namespace`` with Megatron-LM's argument names in the common state next to
``iteration`` / ``checkpoint_version`` / ``num_floating_point_operations_so_far``, a
``latest_checkpointed_iteration.txt`` tracker, and no ``megatron_grow.json``. 8 experts, from
an EP=2 and a TP=2 layout.

**TE names without Transformer Engine.** TE is not installed here, so a TE-spec model cannot be
built. What a TE-spec MoE model stores differs from the local spec's storage in one place, read
from MCore 0.16.1 ``models/gpt/gpt_layer_specs.py``: the local spec maps ``pre_mlp_layernorm.``
to ``mlp.linear_fc1.layer_norm_`` through its ``sharded_state_dict_keys_map``, while the TE MoE
spec keeps a separate ``pre_mlp_layernorm`` (TENorm) module and its keys map has no entry for it,
so it is stored as ``decoder.layers.pre_mlp_layernorm.weight``. The input norm is stored as
``self_attention.linear_qkv.layer_norm_weight`` by both (TE fuses it into the linear, local maps
it); q/k norms, router and experts (SequentialMLP/TEGroupedMLP share
``mlp.experts.experts.linear_fc{1,2}.weight``) have the same keys; the linears' ``_extra_state``
ShardedObjects have the same keys in both (local linears add an empty one for TE compatibility).
So the TE-named source is the stock local-spec model's sharded state dict with exactly that
rename applied, by hand, here. Not exercised on CPU: the *contents* of TE's ``_extra_state``
(FP8 metadata; growth never reads them) and whether TE's norm module adds an ``_extra_state``
of its own.

Each source is grown without --source-config through the real CLI (``megatron_grow.__main__``
in gloo processes) into two target layouts and both spec names; every grown tensor is checked
against the source tensor the growth definition names (index arithmetic written here); the
grown checkpoints load with strict loading into a stock GPTModel with that spec's names;
verify and ``train --grow-from`` run on them; unsupported Megatron-LM args each give one line
and exit 2.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/distributed/test_megatron_lm_interop.py
"""

from __future__ import annotations

import argparse
import contextlib
import io as _io
import os
import shutil

import pytest
import torch
import yaml

from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.conftest import write_recipe

pytestmark = pytest.mark.slow

ITERATION = 100
L, E, K, H, F = 2, 8, 2, 64, 32        # source layers, experts, top-k, hidden, expert FFN
HEADS, GROUPS, KV = 4, 2, 16
VOCAB = 512                            # = the test tokenizer's vocabulary, padded to itself
LOCAL_PRE_MLP = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
TE_PRE_MLP = "decoder.layers.pre_mlp_layernorm.weight"   # TE MoE spec: separate TENorm, no keys-map entry


# ------------------------------------------------------------------------------------------------
# Sources, written with stock Megatron-Core only (run inside gloo processes)


def megatron_lm_args(tp: int, ep: int, **changes) -> argparse.Namespace:
    """What pretrain_gpt.py stores for this model (Megatron-LM argument names)."""
    args = dict(
        num_layers=L, hidden_size=H, ffn_hidden_size=F, num_attention_heads=HEADS, group_query_attention=True,
        num_query_groups=GROUPS, kv_channels=KV, num_experts=E, moe_router_topk=K, moe_ffn_hidden_size=F,
        moe_layer_freq=1, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=1e-3, moe_router_load_balancing_type=["aux_loss"], moe_aux_loss_coeff=[1e-3],
        moe_router_pre_softmax=False, moe_router_topk_scaling_factor=None, moe_router_dtype="fp32",
        moe_shared_expert_intermediate_size=None, moe_grouped_gemm=False, moe_token_dispatcher_type="alltoall",
        swiglu=True, normalization="RMSNorm", norm_epsilon=1e-6, qk_layernorm=True, add_bias_linear=False,
        add_qkv_bias=False, untie_embeddings_and_output_weights=True, position_embedding_type="rope",
        rotary_base=10000, rotary_percent=1.0, max_position_embeddings=32, seq_length=32,
        make_vocab_size_divisible_by=128, padded_vocab_size=VOCAB, vocab_size=None, multi_latent_attention=False,
        mtp_num_layers=None, init_method_std=0.02, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, expert_model_parallel_size=ep,
        world_size=2, micro_batch_size=1, global_batch_size=8, train_iters=1000, lr=1e-4, iteration=ITERATION,
        consumed_train_samples=ITERATION * 8, ckpt_format="torch_dist", use_dist_ckpt=True,
        apply_layernorm_1p=False, rotary_interleaved=False, use_rope_scaling=False, window_size=None,
    )
    args.update(changes)
    return argparse.Namespace(**args)


def stock_model(tp: int, ep: int, num_layers: int, num_experts: int, topk: int):
    """A stock GPTModel (local spec, MCore's own norm) with this test's architecture."""
    import torch.nn.functional as Fn
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=num_layers, hidden_size=H, num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=KV,
        ffn_hidden_size=F, moe_ffn_hidden_size=F, num_moe_experts=num_experts, moe_router_topk=topk,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_dtype="fp32",
        gated_linear_unit=True, activation_func=Fn.silu, normalization="RMSNorm", layernorm_epsilon=1e-6,
        qk_layernorm=True, add_bias_linear=False, init_method_std=0.02, tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep, use_cpu_initialization=True, bias_activation_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        moe_permute_fusion=False, moe_router_fusion=False, persist_layer_norm=False)
    spec = get_gpt_layer_local_spec(num_experts=num_experts, qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=32,
                    share_embeddings_and_output_weights=False, position_embedding_type="rope")


def te_rename(sharded_state_dict: dict) -> None:
    """The one storage-name difference of the TE MoE spec (see the module docstring), applied by hand."""
    for v in sharded_state_dict.values():
        if getattr(v, "key", None) == LOCAL_PRE_MLP:
            v.key = TE_PRE_MLP


def write_megatron_lm_source(root: str, tp: int, ep: int, te_names: bool) -> None:
    """Collective: a randomly initialised stock model saved as pretrain_gpt.py saves a checkpoint."""
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core import parallel_state as ps

    from megatron_grow.platform.cpu import apply_cpu_adaptations

    apply_cpu_adaptations()  # the project's CPU shims for MCore (gloo, RNG tracker)
    torch.distributed.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    tensor_parallel.model_parallel_cuda_manual_seed(1234 + torch.distributed.get_rank())
    torch.manual_seed(1234)
    model = stock_model(tp, ep, L, E, K)
    with torch.no_grad():  # give the norms and expert biases non-trivial values, so copies are visible
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
        for m in model.modules():
            if getattr(m, "expert_bias", None) is not None:
                m.expert_bias.copy_(torch.randn_like(m.expert_bias))
    sd = model.sharded_state_dict()
    if te_names:
        te_rename(sd)
    state = {"model": sd, "args": megatron_lm_args(tp, ep), "checkpoint_version": 3.0, "iteration": ITERATION,
             "num_floating_point_operations_so_far": 1.5e15}
    ckpt = os.path.join(root, f"iter_{ITERATION:07d}")
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, ckpt)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITERATION))
    torch.distributed.barrier()


def cli_main(argv: list) -> int:
    """The real command line (``python -m megatron_grow ...``) inside a spawned rank."""
    from megatron_grow.__main__ import main

    return main(argv)


def plain_tensors(ckpt_dir: str) -> dict:
    """Every stored tensor, whole, with MCore's own reader (one gloo process)."""
    from megatron.core import dist_checkpointing

    torch.distributed.init_process_group("gloo")
    return {k: v.clone() for k, v in dist_checkpointing.load_plain_tensors(ckpt_dir).items()
            if isinstance(v, torch.Tensor)}


def strict_load_into_stock_model(ckpt_dir: str, te_names: bool) -> int:
    """Load a grown checkpoint into a stock GPTModel of the grown shape, raising on any missing or
    unexpected key; returns the number of tensors loaded."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_grow.platform.cpu import apply_cpu_adaptations

    apply_cpu_adaptations()
    torch.distributed.init_process_group("gloo")
    ps.initialize_model_parallel()
    model = stock_model(1, 1, 2 * L, 2 * E, 2 * K)
    sd = model.sharded_state_dict()
    if te_names:
        te_rename(sd)
    loaded = dist_checkpointing.load({"model": sd}, ckpt_dir, strict=StrictHandling.RAISE_ALL)
    model.load_state_dict(loaded["model"], strict=True)  # as Megatron-LM's load_checkpoint does
    return len(loaded["model"])


# ------------------------------------------------------------------------------------------------
# Fixtures

SOURCES = {  # name: (tp, ep, TE names)
    "local_ep2": (1, 2, False),
    "te_tp2": (2, 1, True),
}
TARGETS = {  # name: (world, layout flags, --target-spec)
    "ep2_local": (2, ["--expert-model-parallel-size", "2"], "local"),
    "tp2_te": (2, ["--tensor-model-parallel-size", "2"], "te"),
}


def write_growth_recipe(path: str) -> str:
    """Depth interposition x2 then width x2 with exact copies (noise none), so every grown value is
    a source value; model: is the recipe's default and is NOT the source (the source is resolved
    from its Megatron-LM args)."""
    recipe = {"growth": {"order": ["depth", "width"], "depth": {"mode": "interposition", "factor": 2},
                         "width": {"factor": 2, "noise": "none"}}}
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = {}
    for name, (tp, ep, te) in SOURCES.items():
        root = str(tmp_path_factory.mktemp(name) / "ckpt")
        run_in_processes(write_megatron_lm_source, 2, (root, tp, ep, te))
        out[name] = root
    return out


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    return write_growth_recipe(str(tmp_path_factory.mktemp("recipe") / "grow.yaml"))


@pytest.fixture(scope="module")
def grown(sources, recipe_path, tmp_path_factory):
    out = {}
    for sname, src in sources.items():
        for tname, (world, flags, spec) in TARGETS.items():
            dst = str(tmp_path_factory.mktemp(f"{sname}_{tname}") / "grown")
            argv = ["grow", "--load", src, "--save", dst, "--recipe", recipe_path, "--target-spec", spec,
                    "--quiet", *flags]
            codes = run_in_processes(cli_main, world, (argv,))
            assert codes == [0] * world, f"grow {sname} -> {tname} exited {codes}"
            out[(sname, tname)] = dst
    return out


def read_all(ckpt_root: str) -> dict:
    from megatron_grow.checkpoint import paths

    return run_in_processes(plain_tensors, 1, (paths.resolve_checkpoint_dir(ckpt_root)[0],))[0]


# ------------------------------------------------------------------------------------------------
# Tests


def expected_grown(src: dict, src_pre_mlp: str, dst_pre_mlp: str) -> dict:
    """Interposition x2 (target layer j <- source layer j // 2), then width x2 appended (target expert
    e <- source expert e % E), exact copies: written from the definitions, not with the growth code."""
    layer_of = torch.tensor([j // 2 for j in range(2 * L)])
    expert_of = torch.tensor([e % E for e in range(2 * E)])
    out = {}
    for key, t in src.items():
        if key == src_pre_mlp:
            key = dst_pre_mlp
        if not key.startswith("decoder.layers."):
            out[key] = t                                           # embedding, output layer, final norm
        elif ".mlp.experts.experts." in key:
            out[key] = t[layer_of][:, expert_of]                   # [L, E, ...] stacked experts
        elif key.endswith(("mlp.router.weight", "mlp.router.expert_bias")):
            out[key] = t[layer_of][:, expert_of]                   # router rows [L, E, H], bias [L, E]
        else:
            out[key] = t[layer_of]                                 # attention, norms
    return out


@pytest.mark.parametrize("sname", list(SOURCES))
def test_grown_tensors_match_the_definition(sources, grown, sname):
    src = read_all(sources[sname])
    src_pre = TE_PRE_MLP if SOURCES[sname][2] else LOCAL_PRE_MLP
    assert src_pre in src
    for tname, (_, _, spec) in TARGETS.items():
        got = read_all(grown[(sname, tname)])
        want = expected_grown(src, src_pre, TE_PRE_MLP if spec == "te" else LOCAL_PRE_MLP)
        assert sorted(got) == sorted(want), f"{sname}->{tname}: keys differ: {set(got) ^ set(want)}"
        for key in want:
            assert got[key].shape == want[key].shape, f"{sname}->{tname} {key}: {got[key].shape}"
            assert torch.equal(got[key], want[key]), f"{sname}->{tname} {key}: values differ"


def test_grown_checkpoints_load_strictly_into_stock_mcore(grown):
    for (sname, tname), dst in grown.items():
        from megatron_grow.checkpoint import paths

        te = TARGETS[tname][2] == "te"
        n = run_in_processes(strict_load_into_stock_model, 1, (paths.resolve_checkpoint_dir(dst)[0], te))[0]
        assert n > 0, f"{sname}->{tname}: nothing loaded"


def test_grown_checkpoint_carries_megatron_lm_state(grown):
    """What Megatron-LM's load_checkpoint / check_checkpoint_args read, and our own resolution of it."""
    from megatron.core import dist_checkpointing

    from megatron_grow.checkpoint import paths
    from megatron_grow.checkpoint.megatron_args import model_config_from_args

    ckpt, it = paths.resolve_checkpoint_dir(grown[("local_ep2", "tp2_te")])
    common = dist_checkpointing.load_common_state_dict(ckpt)
    assert it == ITERATION and common["iteration"] == ITERATION and common["checkpoint_version"] == 3.0
    assert common["num_floating_point_operations_so_far"] == 1.5e15
    args = common["args"]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (2 * L, H, HEADS)
    assert (args.num_experts, args.moe_router_topk, args.padded_vocab_size) == (2 * E, 2 * K, VOCAB)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 1)
    assert args.no_save_optim is True and args.no_save_rng is True   # a grown checkpoint has neither
    grown_model = model_config_from_args(args)
    assert (grown_model.num_layers, grown_model.num_moe_experts, grown_model.moe_router_topk) == (2 * L, 2 * E, 2 * K)


def test_verify_runs_and_thresholds_fail_with_exit_4(sources, grown):
    src, dst = sources["te_tp2"], grown[("te_tp2", "ep2_local")]
    base = ["verify", "--load", src, "--grown", dst, "--expert-model-parallel-size", "2"]
    assert run_in_processes(cli_main, 2, (base + ["--max-kl", "100", "--min-routing-share", "0.01"],)) == [0, 0]
    assert run_in_processes(cli_main, 2, (base + ["--max-kl", "1e-30"],)) == [4, 4]


def test_grow_whose_verify_fails_leaves_no_checkpoint(sources, recipe_path, tmp_path):
    dst = str(tmp_path / "grown")
    argv = ["grow", "--load", sources["local_ep2"], "--save", dst, "--recipe", recipe_path, "--quiet",
            "--max-kl", "1e-30"]
    assert run_in_processes(cli_main, 1, (argv,)) == [4]
    assert not os.path.exists(dst), f"a failed grow left {os.listdir(dst)}"


def test_recipe_parallel_is_checked_against_the_grown_model():
    from megatron_grow.config.loader import load_recipe

    recipe = load_recipe("configs/growth/tiny_width.yaml", ["parallel.expert_model_parallel_size=16"])
    assert recipe.parallel.expert_model_parallel_size == 16   # 8 -> 16 experts: EP=16 fits the grown model


def test_train_grow_from_a_megatron_lm_checkpoint(sources, kjv_dataset, tmp_path):
    run_dir = tmp_path / "run"
    # The recipe's model: describes the source as a user's would (a disagreement is refused, naming
    # the field: tests/distributed/test_resume_rules.py).
    path = write_recipe(tmp_path / "train.yaml", kjv_dataset, run_dir, model={"num_layers": L},
                        training={"train_iters": ITERATION + 2, "lr_decay_style": "constant"},
                        checkpoint={"save_interval": 2},
                        growth={"order": ["depth", "width"], "depth": {"factor": 2},
                                "width": {"factor": 2, "noise": "none"}})
    argv = ["train", "--config", path, "--grow-from", sources["te_tp2"]]
    assert run_in_processes(cli_main, 2, (argv + ["parallel.expert_model_parallel_size=2"],)) == [0, 0]
    from megatron_grow.checkpoint import paths
    from megatron_grow.checkpoint.manifest import read_checkpoint_info

    ckpt, it = paths.resolve_checkpoint_dir(str(run_dir))
    info = read_checkpoint_info(ckpt, it)
    assert it == ITERATION + 2
    assert (info.model.num_layers, info.model.num_moe_experts) == (2 * L, 2 * E)
    assert info.lineage and info.lineage[-1]["source_iteration"] == ITERATION


def test_train_resumes_a_te_named_grown_checkpoint(grown, kjv_dataset, tmp_path):
    """A checkpoint grown under TE names loads into this machine's (local-spec) model on resume."""
    from megatron_grow.checkpoint import paths
    from megatron_grow.checkpoint.manifest import read_checkpoint_info

    src = grown[("te_tp2", "tp2_te")]
    run_dir = tmp_path / "run"
    path = write_recipe(tmp_path / "resume.yaml", kjv_dataset, run_dir,
                        training={"train_iters": ITERATION + 1, "lr_decay_style": "constant"},
                        checkpoint={"load": src, "save_interval": 1},
                        growth={"order": ["depth", "width"], "depth": {"factor": 2},
                                "width": {"factor": 2, "noise": "none"}})
    argv = ["train", "--config", path, "parallel.expert_model_parallel_size=2"]
    assert run_in_processes(cli_main, 2, (argv,)) == [0, 0]
    ckpt, it = paths.resolve_checkpoint_dir(str(run_dir))
    info = read_checkpoint_info(ckpt, it)
    assert it == ITERATION + 1 and (info.model.num_layers, info.model.num_moe_experts) == (2 * L, 2 * E)


# ------------------------------------------------------------------------------------------------
# Unsupported Megatron-LM args: one line naming the argument and its value, exit 2

# (id, the args written into common.pt, what the one error line must hold)
UNSUPPORTED = [
    ("mla_default_rope", {"multi_latent_attention": True}, "args.rope_type=None"),  # MLA's default is YaRN
    ("mla_yarn", {"multi_latent_attention": True, "rope_type": "yarn"}, "args.rope_type='yarn'"),
    ("moe_layer_freq_length", {"moe_layer_freq": [0, 1, 1]}, "args.moe_layer_freq=[0, 1, 1]"),
    ("moe_layer_freq_zero", {"moe_layer_freq": 0}, "args.moe_layer_freq=0"),
    # a stacked (all-MoE) checkpoint whose args claim a dense first layer: the tensors disagree
    ("moe_layer_freq_mismatch", {"moe_layer_freq": [0, 1]}, "source architecture disagrees"),
    ("mtp_num_layers", {"mtp_num_layers": 1}, "args.mtp_num_layers=1"),
    ("position_embedding_type", {"position_embedding_type": "learned_absolute"},
     "args.position_embedding_type='learned_absolute'"),
    ("add_bias_linear", {"add_bias_linear": True}, "args.add_bias_linear=True"),
    ("swiglu", {"swiglu": False}, "args.swiglu=False"),
    ("num_experts", {"num_experts": None}, "args.num_experts=None"),
    ("groups_without_group_topk", {"moe_router_num_groups": 2}, "args.moe_router_group_topk (None)"),
    ("groups_not_dividing", {"moe_router_num_groups": 3, "moe_router_group_topk": 1},
     "args.moe_router_num_groups (3)"),
    ("moe_router_load_balancing_type", {"moe_router_load_balancing_type": ["aux_loss", "seq_aux_loss"]},
     "args.moe_router_load_balancing_type=['aux_loss', 'seq_aux_loss']"),
    ("normalization", {"normalization": "L2Norm"}, "args.normalization: 'L2Norm' is not allowed"),
]


@pytest.fixture(scope="module")
def bad_args_sources(sources, tmp_path_factory):
    """Copies of the EP=2 source whose common.pt args each carry unsupported values."""
    from megatron_grow.checkpoint import paths

    out = {}
    for case, overrides, _ in UNSUPPORTED:
        root = str(tmp_path_factory.mktemp(f"bad_{case}") / "ckpt")
        shutil.copytree(sources["local_ep2"], root)
        common_path = os.path.join(paths.iteration_dir(root, ITERATION), "common.pt")
        common = torch.load(common_path, weights_only=False)
        for name, value in overrides.items():
            setattr(common["args"], name, value)
        torch.save(common, common_path)
        out[case] = root
    return out


@pytest.mark.parametrize("case,overrides,expected", UNSUPPORTED, ids=[c for c, _, _ in UNSUPPORTED])
def test_unsupported_args_give_one_line_and_exit_2(bad_args_sources, recipe_path, tmp_path, case, overrides,
                                                    expected):
    from megatron_grow.__main__ import main

    err = _io.StringIO()
    dst = str(tmp_path / "dst")
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io.StringIO()):
        code = main(["grow", "--load", bad_args_sources[case], "--save", dst, "--recipe", recipe_path, "--quiet"])
    lines = err.getvalue().strip().splitlines()
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("megatron-grow: error: ") and expected in lines[0], lines[0]
    assert not os.path.exists(dst)
