"""Hugging Face interop, end to end on CPU: tiny random models built with ``transformers`` (no
downloads), saved with ``save_pretrained`` as sharded safetensors, imported into our checkpoints.

* our Megatron-Core forward equals ``transformers``' logits (fp32, max |diff| <= 1e-4) after an
  import into 1 process, TP=2 and EP=2 (gloo), for every supported class;
* export writes exactly the tensors ``save_pretrained`` wrote (bit-exact, also from the TP=2
  checkpoint), ``from_pretrained`` loads it, and re-importing the export is bit-exact;
* a grown checkpoint (the real growth: depth x2 interposition, width x2 with noise) exported
  loads with ``from_pretrained`` and gives our logits; DeepSeek-V3 (multi-latent attention, grouped
  routing, shared expert) grown by depth, width and both, and with alpha 0 width growth the source's logits.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_grow.config.schema import DepthGrowthConfig, GrowthConfig, ParallelConfig, WidthGrowthConfig
from megatron_grow.interop.hf.exporter import export_hf
from megatron_grow.interop.hf.tiny import ARCHITECTURES, save_tiny_model
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.bodies import first_result, probe_batches
from tests.distributed.hf_bodies import (
    SEQ,
    checkpoint_tensors,
    grow_and_forward,
    grow_many_and_forward,
    import_export_reimport,
    import_in_layouts,
    safetensors_dir,
)

TOLERANCE = 1e-4
PARTIAL_ROPE = "Glm4MoeForCausalLM-partial-rope"
LAYOUTS = {"tp2": ParallelConfig(tensor_model_parallel_size=2), "ep2": ParallelConfig(expert_model_parallel_size=2)}


def hf_logits(hf_dir: str, vocab: int) -> torch.Tensor:
    """transformers' logits on the same probe batches our forward uses (from_pretrained, fp32)."""
    import transformers

    from megatron_grow.config.schema import ModelConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.cat(probe_batches(ModelConfig(vocab_size=vocab, seq_length=SEQ)))
    with torch.no_grad():
        return model(tokens).logits


def max_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return (ours[..., :ref.shape[-1]] - ref).abs().max().item()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, arch in enumerate(ARCHITECTURES):
        hf_dir = save_tiny_model(arch, str(root / arch), seed=i)
        assert os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json"))  # really sharded
        out[arch] = {"hf_dir": hf_dir, "work": str(tmp_path_factory.mktemp(arch)),
                     "ref": hf_logits(hf_dir, 300)}
    # GLM-4.5 rotates half of each head (partial_rotary_factor 0.5 -> model.rotary_percent 0.5).
    hf_dir = save_tiny_model("Glm4MoeForCausalLM", str(root / PARTIAL_ROPE), seed=7, partial_rotary_factor=0.5)
    out[PARTIAL_ROPE] = {"hf_dir": hf_dir, "work": str(tmp_path_factory.mktemp("partial")),
                         "ref": hf_logits(hf_dir, 300)}
    return out


@pytest.fixture(scope="module")
def single(hf_models):
    cases = [(a, m["hf_dir"], m["work"]) for a, m in hf_models.items()]
    return run_in_processes(import_export_reimport, 1, (cases,), timeout=600)[0]


@pytest.fixture(scope="module")
def parallel(hf_models):
    cases = [(a, m["hf_dir"], m["work"]) for a, m in hf_models.items() if a in ARCHITECTURES]
    results = run_in_processes(import_in_layouts, 2, (cases, LAYOUTS), timeout=600)
    merged = {}
    for r in results:
        merged.update({k: v for k, v in r.items() if v["logits"] is not None})
    return merged


@pytest.mark.parametrize("arch", ARCHITECTURES + (PARTIAL_ROPE,))
def test_import_matches_transformers_one_process(arch, hf_models, single):
    diff = max_diff(single[arch]["logits"], hf_models[arch]["ref"])
    print(f"{arch} 1 process: max|diff| = {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_import_matches_transformers_parallel(arch, layout_name, hf_models, parallel):
    diff = max_diff(parallel[(arch, layout_name)]["logits"], hf_models[arch]["ref"])
    print(f"{arch} {layout_name}: max|diff| = {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_is_bit_exact_and_loads(arch, hf_models, single):
    m = hf_models[arch]
    original, exported = safetensors_dir(m["hf_dir"]), safetensors_dir(f"{m['work']}/exported")
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original), \
        [k for k in original if not torch.equal(original[k], exported[k])]
    assert torch.equal(hf_logits(f"{m['work']}/exported", 300), m["ref"])
    first, again = checkpoint_tensors(f"{m['work']}/ckpt"), checkpoint_tensors(f"{m['work']}/reimported")
    assert sorted(first) == sorted(again)
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "OlmoeForCausalLM"])
def test_export_from_tensor_parallel_checkpoint(arch, hf_models, parallel, tmp_path):
    m = hf_models[arch]
    export_hf(f"{m['work']}/tp2", str(tmp_path / "out"), progress=False)
    original, exported = safetensors_dir(m["hf_dir"]), safetensors_dir(str(tmp_path / "out"))
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)


@pytest.mark.parametrize("arch", ["Glm4MoeForCausalLM",
                                  pytest.param("Qwen3MoeForCausalLM", marks=pytest.mark.slow)])
def test_grown_checkpoint_exports_and_matches(arch, hf_models, single, tmp_path):
    growth = GrowthConfig(order=("depth", "width"), depth=DepthGrowthConfig(factor=2),
                          width=WidthGrowthConfig(factor=2, alpha=0.01))
    grown = str(tmp_path / "grown")
    ours = first_result(run_in_processes(grow_and_forward, 2, (f"{hf_models[arch]['work']}/ckpt", grown, growth,
                                                                ParallelConfig(expert_model_parallel_size=2))))
    export_hf(grown, str(tmp_path / "hf"), progress=False)
    import json

    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg["architectures"] == [arch] and cfg["num_hidden_layers"] == 4 and cfg["num_experts_per_tok"] == 4
    diff = max_diff(ours["logits"], hf_logits(str(tmp_path / "hf"), ours["vocab"]))
    print(f"{arch} grown (4 layers, 16 experts, top-4): max|diff| = {diff:.2e}")
    assert diff <= TOLERANCE


DEEPSEEK = "DeepseekV3ForCausalLM"


def test_deepseek_v3_grown_by_depth_width_and_both_exports_and_loads(hf_models, single, tmp_path):
    """MLA + grouped routing + shared expert grown three ways on EP=2, exported, loaded by transformers:
    its logits are ours; width with alpha 0 (copy groups, top-k 4 -> 8, topk_group 2 -> 4) is the source's."""
    import json

    cases = {"depth": GrowthConfig(depth=DepthGrowthConfig(factor=2)),
             "width_alpha0": GrowthConfig(width=WidthGrowthConfig(factor=2, alpha=0.0)),
             "both": GrowthConfig(order=("depth", "width"), depth=DepthGrowthConfig(factor=2),
                                  width=WidthGrowthConfig(factor=2, alpha=0.01))}
    roots = {name: (str(tmp_path / name), growth) for name, growth in cases.items()}
    ours = first_result(run_in_processes(grow_many_and_forward, 2, (f"{hf_models[DEEPSEEK]['work']}/ckpt", roots,
                                                                     ParallelConfig(expert_model_parallel_size=2))))
    for name in cases:
        export_hf(str(tmp_path / name), str(tmp_path / f"{name}_hf"), progress=False)
        cfg = json.load(open(tmp_path / f"{name}_hf" / "config.json"))
        theirs = hf_logits(str(tmp_path / f"{name}_hf"), 300)
        diff = max_diff(ours[name]["logits"], theirs)
        print(f"{DEEPSEEK} grown {name} ({cfg['num_hidden_layers']} layers, {cfg['n_routed_experts']} experts in "
              f"{cfg['n_group']} groups, top-{cfg['num_experts_per_tok']} of top-{cfg['topk_group']} groups): "
              f"max|diff| ours vs transformers = {diff:.2e}")
        assert diff <= TOLERANCE
        if name == "width_alpha0":
            assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["n_group"], cfg["topk_group"]) == \
                (16, 8, 8, 4)
            to_source = max_diff(theirs, hf_models[DEEPSEEK]["ref"])
            print(f"{DEEPSEEK} width alpha 0 vs the source: max|diff| = {to_source:.2e}")
            assert to_source <= TOLERANCE


def test_export_to_a_class_that_cannot_hold_the_model_is_refused(hf_models, single, tmp_path, capsys):
    from megatron_grow.__main__ import main

    ckpt = f"{hf_models['Qwen3MoeForCausalLM']['work']}/ckpt"
    rc = main(["export-hf", "--load", ckpt, "--hf-dir", str(tmp_path / "out"), "--architecture", "MixtralForCausalLM"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("megatron-grow: error")]
    assert rc == 2 and len(errors) == 1 and "Mixtral has no QK-norm" in errors[0], errors
    assert not os.path.exists(tmp_path / "out")
