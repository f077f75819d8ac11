"""Hugging Face config translation and bad input: one line, exit code 2, nothing written.

The configs come from ``transformers``' own config classes (``to_dict()``), not hand-written JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest

from megatron_grow.__main__ import main
from megatron_grow.config.schema import ModelConfig
from megatron_grow.errors import InteropError
from megatron_grow.interop.hf.families import FAMILIES, family_for_hf_config, family_for_model
from megatron_grow.interop.hf.tiny import ARCHITECTURES, save_tiny_model, tiny_config


def hf_dict(arch: str, **overrides) -> dict:
    d = tiny_config(arch, **overrides).to_dict()
    d["architectures"] = [arch]
    return d


def to_model(arch: str, **overrides) -> ModelConfig:
    from megatron_grow.interop.hf.importer import model_from_hf_config

    hf = hf_dict(arch, **overrides)
    return model_from_hf_config(hf, family_for_hf_config(hf, "test"), "test")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_round_trip(arch):
    model = to_model(arch)
    family, fields = family_for_model(model, arch)
    assert family.architecture == arch
    again = family.read_config({**fields, "architectures": [arch]}, "again")
    for key, value in again.items():
        if key != "seq_length":
            assert getattr(model, key) == value, key


def test_router_semantics_map_to_mcore_fields():
    # softmax, top-k renormalised == top-k logits then softmax (pre_softmax False), and the converse
    assert to_model("Qwen3MoeForCausalLM", norm_topk_prob=True).moe_router_pre_softmax is False
    assert to_model("Qwen3MoeForCausalLM", norm_topk_prob=False).moe_router_pre_softmax is True
    assert to_model("MixtralForCausalLM").moe_router_pre_softmax is False
    glm = to_model("Glm4MoeForCausalLM", routed_scaling_factor=2.5)
    assert (glm.moe_router_score_function, glm.moe_router_enable_expert_bias,
            glm.moe_router_topk_scaling_factor) == ("sigmoid", True, 2.5)
    qwen2 = to_model("Qwen2MoeForCausalLM")
    assert (qwen2.moe_shared_expert_intermediate_size, qwen2.moe_shared_expert_gate, qwen2.add_qkv_bias) == \
        (48, True, True)
    olmoe = to_model("OlmoeForCausalLM")
    assert olmoe.qk_layernorm and olmoe.qk_layernorm_across_heads


def test_deepseek_v3_maps_onto_mla_and_grouped_routing():
    ds = to_model("DeepseekV3ForCausalLM", routed_scaling_factor=2.5, n_shared_experts=2)
    assert (ds.multi_latent_attention, ds.q_lora_rank, ds.kv_lora_rank, ds.qk_head_dim, ds.qk_pos_emb_head_dim,
            ds.v_head_dim) == (True, 24, 16, 8, 8, 12)
    assert (ds.moe_router_score_function, ds.moe_router_enable_expert_bias, ds.moe_router_topk_scaling_factor,
            ds.moe_router_num_groups, ds.moe_router_group_topk) == ("sigmoid", True, 2.5, 4, 2)
    assert (ds.moe_shared_expert_intermediate_size, ds.moe_shared_expert_gate) == (2 * 32, False)
    # no query latent (DeepSeek-V2-Lite style); every group selected is no grouping at all
    plain = to_model("DeepseekV3ForCausalLM", q_lora_rank=None, n_group=4, topk_group=4, n_shared_experts=0)
    assert (plain.q_lora_rank, plain.moe_router_num_groups, plain.moe_shared_expert_intermediate_size) == \
        (None, None, None)


def test_mla_and_grouped_models_export_only_where_they_map():
    ds = to_model("DeepseekV3ForCausalLM")
    assert family_for_model(ds)[0].architecture == "DeepseekV3ForCausalLM"
    for arch in FAMILIES:  # a model each other class holds, plus MLA or groups: refused, not dropped
        if arch != "DeepseekV3ForCausalLM":
            own = to_model(arch)
            with pytest.raises(InteropError, match="multi_latent_attention"):
                FAMILIES[arch].write_config(dataclasses.replace(own, multi_latent_attention=True))
            with pytest.raises(InteropError, match="moe_router_num_groups"):
                FAMILIES[arch].write_config(dataclasses.replace(own, moe_router_num_groups=2, moe_router_group_topk=1))
    # width growth with the interleave layout keeps 4 groups and raises top-k to 8: transformers' top-2 group
    # score no longer equals MCore's top-4 one
    interleaved = dataclasses.replace(ds, num_moe_experts=16, moe_router_topk=8)
    with pytest.raises(InteropError, match="moe_router_group_topk=2 with model.moe_router_topk=8"):
        FAMILIES["DeepseekV3ForCausalLM"].write_config(interleaved)


@pytest.mark.parametrize("arch, overrides, needle", [
    ("Glm4MoeForCausalLM", {"norm_topk_prob": False}, "renormalises exactly when k > 1"),
    ("Glm4MoeForCausalLM", {"first_k_dense_replace": 2}, "every layer is dense"),
    ("Glm4MoeForCausalLM", {"n_group": 2, "topk_group": 1}, "n_group"),
    ("Qwen3MoeForCausalLM", {"mlp_only_layers": [0, 1]}, "every layer is dense"),
    ("MixtralForCausalLM", {"mlp_only_layers": [0]}, "mlp_only_layers"),
    ("Qwen3MoeForCausalLM", {"num_experts_per_tok": 1, "norm_topk_prob": True}, "top-1"),
    ("Qwen3MoeForCausalLM", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                 "original_max_position_embeddings": 64}}, "yarn"),
    ("MixtralForCausalLM", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("OlmoeForCausalLM", {"clip_qkv": 8.0}, "clip_qkv"),
    ("Qwen3MoeForCausalLM", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window=True"),
    ("Qwen2MoeForCausalLM", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window=True"),
    ("MixtralForCausalLM", {"sliding_window": 16}, "sliding_window=16"),
    ("DeepseekV3ForCausalLM", {"first_k_dense_replace": 4}, "every layer is dense"),
    ("DeepseekV3ForCausalLM", {"rope_interleave": False}, "rope_interleave=False"),
    ("DeepseekV3ForCausalLM", {"attention_bias": True}, "attention_bias=True"),
    ("DeepseekV3ForCausalLM", {"num_key_value_heads": 2}, "num_key_value_heads=2"),
    ("DeepseekV3ForCausalLM", {"norm_topk_prob": False}, "renormalises exactly when k > 1"),
    # transformers scores a group by its top-2 experts; MCore by its top topk/topk_group = 4 here
    ("DeepseekV3ForCausalLM", {"n_group": 4, "topk_group": 1}, "topk_group=1 with num_experts_per_tok=4"),
    ("DeepseekV3ForCausalLM", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                   "original_max_position_embeddings": 64}}, "yarn"),
])
def test_import_refuses_what_does_not_map(arch, overrides, needle):
    with pytest.raises(InteropError, match=needle):
        to_model(arch, **overrides)


def test_dense_layers_and_shared_experts_map_to_mcore_fields():
    # GLM-4.5: the first k layers dense (MLP intermediate_size wide), n shared experts = one MLP n x F wide.
    glm = to_model("Glm4MoeForCausalLM", num_hidden_layers=3, first_k_dense_replace=1, n_shared_experts=2)
    assert (glm.moe_layer_freq, glm.ffn_hidden_size) == ((0, 1, 1), 96)
    assert (glm.moe_shared_expert_intermediate_size, glm.moe_shared_expert_gate) == (2 * 32, False)
    # DeepSeek-V3 shares the mapping: first_k_dense_replace dense layers, n_shared_experts ungated experts.
    ds = to_model("DeepseekV3ForCausalLM", num_hidden_layers=3, first_k_dense_replace=2, intermediate_size=80)
    assert (ds.moe_layer_freq, ds.ffn_hidden_size, ds.moe_shared_expert_intermediate_size) == ((0, 0, 1), 80, 32)
    assert family_for_model(ds, "DeepseekV3ForCausalLM")[1]["first_k_dense_replace"] == 2
    # Qwen: layer i is MoE iff i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    qwen = to_model("Qwen3MoeForCausalLM", num_hidden_layers=6, mlp_only_layers=[5], decoder_sparse_step=2)
    assert qwen.moe_layer_freq == (0, 1, 0, 1, 0, 0)
    assert to_model("Qwen3MoeForCausalLM").moe_layer_freq == 1   # no dense layer: the all-MoE stack as before
    # and back
    family, fields = family_for_model(glm, "Glm4MoeForCausalLM")
    assert (fields["first_k_dense_replace"], fields["n_shared_experts"], fields["intermediate_size"]) == (1, 2, 96)
    family, fields = family_for_model(qwen, "Qwen3MoeForCausalLM")
    assert (fields["mlp_only_layers"], fields["decoder_sparse_step"]) == ([0, 2, 4, 5], 1)


def test_export_refuses_dense_layers_a_class_cannot_place():
    glm = dataclasses.replace(to_model("Glm4MoeForCausalLM", num_hidden_layers=3), moe_layer_freq=(1, 0, 1),
                              ffn_hidden_size=96)
    with pytest.raises(InteropError, match="not the first layers"):
        FAMILIES["Glm4MoeForCausalLM"].write_config(glm)
    with pytest.raises(InteropError, match="this class has none"):
        FAMILIES["MixtralForCausalLM"].write_config(dataclasses.replace(
            to_model("MixtralForCausalLM", num_hidden_layers=3), moe_layer_freq=(0, 1, 1)))


def test_qwen2_moe_with_its_own_head_dim_exports_as_it_imports():
    # head_dim 24 != hidden 64 / 4 heads: transformers' Qwen2-MoE attention reads head_dim, so export writes it.
    model = to_model("Qwen2MoeForCausalLM", head_dim=24)
    assert model.kv_channels == 24
    assert FAMILIES["Qwen2MoeForCausalLM"].write_config(model)["head_dim"] == 24


def test_export_refuses_a_class_that_cannot_hold_the_model():
    paper = ModelConfig()  # sigmoid router with expert bias, per-head QK-norm: only GLM-4.5 holds it
    assert family_for_model(paper)[0].architecture == "Glm4MoeForCausalLM"
    for arch in FAMILIES:
        if arch != "Glm4MoeForCausalLM":
            with pytest.raises(InteropError):
                FAMILIES[arch].write_config(paper)
    with pytest.raises(InteropError, match="no supported Hugging Face class"):
        family_for_model(ModelConfig(normalization="LayerNorm"))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny_model("Qwen3MoeForCausalLM", str(tmp_path_factory.mktemp("hf") / "qwen"))


def run_cli(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [line for line in err if line.startswith("megatron-grow: error")]


def broken_copy(src: str, dst: str, edit) -> str:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_config(key, value):
    def edit(d):
        path = os.path.join(d, "config.json")
        cfg = json.load(open(path))
        cfg[key] = value
        json.dump(cfg, open(path, "w"))
    return edit


def _drop_shard(d):
    os.remove(os.path.join(d, sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[-1]))


@pytest.mark.parametrize("case, edit, needle", [
    ("missing_shard", _drop_shard, "safetensors shard missing"),
    ("unknown_arch", lambda d: (_edit_config("architectures", ["LlamaForCausalLM"])(d),
                                _edit_config("model_type", "llama")(d)), "unknown architecture"),
    ("shape_mismatch", _edit_config("moe_intermediate_size", 48), "shape mismatch"),
    ("sliding_window", _edit_config("use_sliding_window", True), "use_sliding_window=True"),
])
def test_import_bad_input_is_one_line_exit_2(case, edit, needle, qwen_dir, tmp_path, capsys):
    bad = broken_copy(qwen_dir, str(tmp_path / case), edit)
    rc, errors = run_cli(["import-hf", "--hf-dir", bad, "--save", str(tmp_path / "out")], capsys)
    assert rc == 2 and len(errors) == 1 and needle in errors[0], errors
    assert not os.path.exists(tmp_path / "out")


def test_export_bad_input_is_one_line_exit_2(tmp_path, capsys):
    rc, errors = run_cli(["export-hf", "--load", str(tmp_path / "nothing"), "--hf-dir", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(errors) == 1 and "does not exist" in errors[0], errors


def test_sentencepiece_tokenizer_converts_exactly(tmp_path):
    """The HF tokenizer written for a train-tokenizer model encodes as sentencepiece does, except for
    characters the tokenizer does not cover: sentencepiece emits <unk> (id 0), the converted one drops them.
    (Runs of several spaces also differ; the corpus has none.)"""
    import gzip

    import sentencepiece as spm
    import transformers

    from megatron_grow.data.tokenizer import train_tokenizer
    from megatron_grow.interop.hf.tokenizer import sentencepiece_to_hf_dir

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with gzip.open(os.path.join(repo, "data", "corpus", "kjv.txt.gz"), "rt", encoding="utf-8") as f:
        text = f.read(300_000)
    (tmp_path / "part.txt").write_text(text[:200_000], encoding="utf-8")
    train_tokenizer([str(tmp_path / "part.txt")], str(tmp_path / "tok"), 400)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    hf = transformers.AutoTokenizer.from_pretrained(sentencepiece_to_hf_dir(str(tmp_path / "tok.model"),
                                                                            str(tmp_path / "hf")))
    lines = text[200_000:].splitlines()[:300] + ["Jesus wept.\nAnd two lines"]
    covered = [line for line in lines if 0 not in sp.encode(line)]
    assert len(covered) > 250
    assert [hf.encode(line, add_special_tokens=False) for line in covered] == [sp.encode(line) for line in covered]
    uncovered = [line for line in lines if 0 in sp.encode(line)]
    assert all([t for t in sp.encode(line) if t != 0] == hf.encode(line, add_special_tokens=False)
               for line in uncovered)


def _add_mtp_layer(hf_dir: str) -> int:
    """Store a multi-token-prediction layer as the hub's GLM-4.5 / DeepSeek-V3 checkpoints do: tensors of
    layer ``num_hidden_layers`` in their own shard, listed in the index (``save_pretrained`` never writes
    them; written here with safetensors' own ``save_file``). Returns that layer's index."""
    import torch
    from safetensors.torch import save_file

    layer = json.load(open(os.path.join(hf_dir, "config.json")))["num_hidden_layers"]
    mtp = {f"model.layers.{layer}.eh_proj.weight": torch.randn(64, 128),
           f"model.layers.{layer}.enorm.weight": torch.ones(64)}
    save_file(mtp, os.path.join(hf_dir, "model-mtp.safetensors"), metadata={"format": "pt"})
    index_path = os.path.join(hf_dir, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"].update({name: "model-mtp.safetensors" for name in mtp})
    json.dump(index, open(index_path, "w"))
    return layer


def test_mtp_layers_in_the_files_are_refused_unless_dropped(tmp_path, capsys):
    """``num_nextn_predict_layers`` 1 with no such tensors (what ``save_pretrained`` writes) maps: nothing is
    lost. With the layer stored in the files: one line naming the field and the layer, exit 2, nothing
    written; ``--drop-mtp`` imports without it and says so."""
    assert to_model("DeepseekV3ForCausalLM", num_nextn_predict_layers=1).multi_latent_attention
    hf_dir = save_tiny_model("DeepseekV3ForCausalLM", str(tmp_path / "deepseek"), num_nextn_predict_layers=1)
    layer = _add_mtp_layer(hf_dir)
    out = str(tmp_path / "out")
    rc, errors = run_cli(["import-hf", "--hf-dir", hf_dir, "--save", out], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert "num_nextn_predict_layers=1" in errors[0] and f"[{layer}]" in errors[0] and "--drop-mtp" in errors[0]
    assert not os.path.exists(out)
    assert main(["import-hf", "--hf-dir", hf_dir, "--save", out, "--drop-mtp", "--quiet"]) == 0
    assert f"multi-token-prediction layer(s) [{layer}] (--drop-mtp)" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "latest_checkpointed_iteration.txt"))
