"""Hugging Face interop of mixed dense/MoE stacks, end to end on CPU, with tiny random models built by
``transformers``' own config classes (``Glm4MoeConfig``, ``Qwen3MoeConfig``, ``Qwen2MoeConfig``):

* GLM-4.5 with ``first_k_dense_replace`` 1 and ``n_shared_experts`` 1 (4 layers: 1 dense, 3 MoE);
* Qwen3-MoE with ``mlp_only_layers`` [1] (3 layers);
* Qwen2-MoE with ``mlp_only_layers`` [0] and ``head_dim`` 24 != hidden/heads (which export refused before);
* DeepSeek-V3 (multi-latent attention, grouped routing, a shared expert) with ``first_k_dense_replace`` 1.

For each: our logits equal ``transformers``' (fp32, max |diff| <= 1e-4) after an import into 1 process,
TP=2 and EP=2 (GLM and DeepSeek also PP=2, whose stages hold a dense+MoE and an MoE+MoE pair); export writes exactly the
tensors ``save_pretrained`` wrote and re-importing it is bit-exact; grown checkpoints (depth x2, width x2,
both) export, load with ``from_pretrained`` and give our logits; width with alpha 0 gives the source's logits.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/distributed/test_hf_mixed_stacks.py
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_grow.config.schema import DepthGrowthConfig, GrowthConfig, ParallelConfig, WidthGrowthConfig
from megatron_grow.interop.hf.tiny import save_tiny_model
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.hf_bodies import checkpoint_tensors, import_export_reimport, safetensors_dir
from tests.distributed.test_hf_interop import TOLERANCE, hf_logits, max_diff

pytestmark = pytest.mark.slow  # ~1-2 min on 2 shared cores: 3 process starts

MODELS = {
    "glm_dense_first_shared": ("Glm4MoeForCausalLM", dict(num_hidden_layers=4, first_k_dense_replace=1,
                                                          n_shared_experts=1)),
    "qwen3_mlp_only": ("Qwen3MoeForCausalLM", dict(num_hidden_layers=3, mlp_only_layers=[1])),
    "qwen2_mlp_only_head_dim": ("Qwen2MoeForCausalLM", dict(num_hidden_layers=2, mlp_only_layers=[0], head_dim=24)),
    "deepseek_v3_dense_first": ("DeepseekV3ForCausalLM", dict(num_hidden_layers=4, first_k_dense_replace=1,
                                                              intermediate_size=80)),
}
LAYOUTS = {"tp2": ParallelConfig(tensor_model_parallel_size=2), "ep2": ParallelConfig(expert_model_parallel_size=2)}
PP2 = ParallelConfig(pipeline_model_parallel_size=2)
PP_CASES = ["glm_dense_first_shared", "deepseek_v3_dense_first"]  # stages of unequal dense/MoE mixes
GROWTHS = {
    "depth": GrowthConfig(order=("depth",), depth=DepthGrowthConfig(factor=2)),
    "width": GrowthConfig(order=("width",), width=WidthGrowthConfig(factor=2, alpha=0.01)),
    "both": GrowthConfig(order=("depth", "width"), depth=DepthGrowthConfig(factor=2),
                         width=WidthGrowthConfig(factor=2, alpha=0.01)),
    "width_alpha0": GrowthConfig(order=("width",), width=WidthGrowthConfig(factor=2, alpha=0.0)),
}


def layouts_and_growths(cases: list, layouts: dict, pp_cases: list, growths: dict) -> dict:
    """On 2 processes: each case imported into each layout (GLM also PP=2), then the 1-process import
    grown (EP=2 target) each way and exported; our logits of every result."""
    from megatron_grow.interop.hf.exporter import export_hf
    from tests.distributed.hf_bodies import grow_and_forward, import_forward

    out = {}
    for name, hf_dir, work in cases:
        todo = dict(layouts, **({"pp2": PP2} if name in pp_cases else {}))
        for lname, parallel in todo.items():
            out[(name, lname)] = import_forward(hf_dir, f"{work}/{lname}", parallel)
        for gname, growth in growths.items():
            grown = f"{work}/grown_{gname}"
            out[(name, gname)] = grow_and_forward(f"{work}/ckpt", grown, growth,
                                                  ParallelConfig(expert_model_parallel_size=2))
            torch.distributed.barrier()
            if torch.distributed.get_rank() == 0:
                export_hf(grown, f"{work}/hf_{gname}", progress=False)
            torch.distributed.barrier()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_mixed")
    out = {}
    for i, (name, (arch, overrides)) in enumerate(MODELS.items()):
        hf_dir = save_tiny_model(arch, str(root / name), seed=20 + i, **overrides)
        out[name] = {"arch": arch, "hf_dir": hf_dir, "work": str(tmp_path_factory.mktemp(name)),
                     "ref": hf_logits(hf_dir, 300)}
    cases = [(n, m["hf_dir"], m["work"]) for n, m in out.items()]
    single = run_in_processes(import_export_reimport, 1, (cases,), timeout=600)[0]
    results = run_in_processes(layouts_and_growths, 2, (cases, LAYOUTS, PP_CASES, GROWTHS),
                               timeout=600)
    merged = {}
    for r in results:
        merged.update({k: v for k, v in r.items() if v is not None and v["logits"] is not None})
    return {"models": out, "single": single, "merged": merged}


@pytest.mark.parametrize("name", list(MODELS))
def test_import_matches_transformers_in_every_layout(name, models):
    ref = models["models"][name]["ref"]
    diffs = {"1 process": max_diff(models["single"][name]["logits"], ref)}
    layouts = list(LAYOUTS) + (["pp2"] if name in PP_CASES else [])
    diffs.update({lname: max_diff(models["merged"][(name, lname)]["logits"], ref) for lname in layouts})
    print(f"{name}: max|diff| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert all(d <= TOLERANCE for d in diffs.values()), diffs


@pytest.mark.parametrize("name", list(MODELS))
def test_export_is_bit_exact_and_reimports_bit_exact(name, models):
    m = models["models"][name]
    original, exported = safetensors_dir(m["hf_dir"]), safetensors_dir(f"{m['work']}/exported")
    assert sorted(original) == sorted(exported)
    assert [k for k in original if not torch.equal(original[k], exported[k])] == []
    with open(os.path.join(m["work"], "exported", "config.json")) as f:
        cfg = json.load(f)
    for key, value in MODELS[name][1].items():
        assert cfg[key] == value, key
    first, again = checkpoint_tensors(f"{m['work']}/ckpt"), checkpoint_tensors(f"{m['work']}/reimported")
    assert sorted(first) == sorted(again) and all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("name", list(MODELS))
def test_grown_models_export_and_match(name, models):
    m = models["models"][name]
    layers = MODELS[name][1]["num_hidden_layers"]
    for gname in GROWTHS:
        ours = models["merged"][(name, gname)]
        hf_dir = f"{m['work']}/hf_{gname}"
        with open(os.path.join(hf_dir, "config.json")) as f:
            cfg = json.load(f)
        assert cfg["num_hidden_layers"] == (2 * layers if gname in ("depth", "both") else layers), gname
        diff = max_diff(ours["logits"], hf_logits(hf_dir, ours["vocab"]))
        print(f"{name} grown {gname}: max|diff| = {diff:.2e}")
        assert diff <= TOLERANCE, gname
    # depth x2 interposition copies each layer in place: the dense first layer becomes the first two.
    if name in PP_CASES:
        with open(os.path.join(m["work"], "hf_depth", "config.json")) as f:
            assert json.load(f)["first_k_dense_replace"] == 2
    # width with alpha 0: the copies are exact and top-k doubles, so the function is the source's.
    alpha0 = hf_logits(f"{m['work']}/hf_width_alpha0", 300)
    diff = max_diff(alpha0, m["ref"])
    print(f"{name} width alpha 0 vs source: max|diff| = {diff:.2e}")
    assert diff <= TOLERANCE
