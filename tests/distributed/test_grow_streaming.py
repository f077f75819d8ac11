"""The streaming offline growth writes exactly what the in-memory growth wrote, in a format stock
Megatron-Core loads strictly.

* The source is the tiny MoE (4 layers, 8 experts, sigmoid router with expert bias) with every
  weight set by a closed formula (no RNG), saved by ``io.save_checkpoint``.
* It is grown depth x2 then width x2 (gaussian noise, per-layer std, seed 1234) into three
  layouts: 2 ranks EP=2, 2 ranks TP=2 and 1 rank.
* Every stored tensor of every result must hash (SHA-256 of its bytes, with dtype and shape) to
  ``FROZEN``: the hashes of what the growth wrote before it streamed (the code that built the whole
  target model and saved it with ``dist_checkpointing.save``, commit a72e0a9), recorded once by
  running that code on this source. So the streaming rewrite is bit-identical to it.
* The EP=2 result is loaded by Megatron-Core's own ``dist_checkpointing.load`` with
  ``StrictHandling.RAISE_ALL`` (no missing, no unexpected key) into a freshly built, NaN-filled
  model: every parameter and the expert bias come back finite.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/distributed/test_grow_streaming.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch

from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.bodies import grow_body, plain_tensors_of_many, strict_load_into_nan_model

pytestmark = pytest.mark.slow  # ~1-2 min on 2 shared cores: one save, three growths, one strict load

RECIPE = load_recipe("configs/growth/tiny_depth_width.yaml")  # depth x2 then width x2, gaussian alpha 0.01
SOURCE_MODEL = dataclasses.replace(RECIPE.model, seq_length=32)
GROWTH = dataclasses.replace(RECIPE.growth, width=dataclasses.replace(RECIPE.growth.width,
                                                                      noise_granularity="per_layer"))

LAYOUTS = {
    "ep2": (2, ParallelConfig(expert_model_parallel_size=2)),
    "tp2": (2, ParallelConfig(tensor_model_parallel_size=2)),
    "one_rank": (1, ParallelConfig()),
}

# SHA-256 of (dtype, shape, bytes) of every tensor the pre-streaming growth (commit a72e0a9) wrote
# for this source and GROWTH (identical for the three layouts).
FROZEN = {
    "decoder.final_layernorm.weight":
        "84f5c4ca95a22425a874e91ef21bd2107a6d0c0c9fc2118aee1255503db9e1fb",
    "decoder.layers.mlp.experts.experts.linear_fc1.weight":
        "5d11cb5c35df152e97035ad91559335d05a46eac5b7c7d843832d6bfd446ed11",
    "decoder.layers.mlp.experts.experts.linear_fc2.weight":
        "a4df99dad291e88d2c4190615186c328e62bd52984e6d6848ad1d821cf871ba4",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight":
        "9c401b6cc0c339d8c9039fbf06da8729bda4a13a036caab0c473f2abe33c461e",
    "decoder.layers.mlp.router.expert_bias":
        "b49b6c5708d2451a615bb4e755ccf7d175283155ad1e9454cb5949f48522367b",
    "decoder.layers.mlp.router.weight":
        "e5255cdd88c7a68eb3ee0a98dec37e0b7460f9dec350856f8d27539fe5ae561e",
    "decoder.layers.self_attention.k_layernorm.weight":
        "44717cfd8fbd255c2335b8d6c0ec08b458b2532524d9d88035a8e6153d1016eb",
    "decoder.layers.self_attention.linear_proj.weight":
        "586659667e39789ec8404c88f025a00e407dc227c9782092ec50b9a32619ce04",
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight":
        "51eb139ff6cf31804eed8a9c510c9c1a96c08640c6481d80abb5436aadbeef3d",
    "decoder.layers.self_attention.linear_qkv.weight":
        "6511454dad705b60729f7dce929a061d4b78fe89f9887f33dfdc2596a0b07679",
    "decoder.layers.self_attention.q_layernorm.weight":
        "352cc940b411cf6544462a034999fa5dfd458b981a44017d4c4ce1c85de0a446",
    "embedding.word_embeddings.weight":
        "b05cd76e1b24fb236e8139a04bf025cfed842acadf43fd323cbd019a214efac7",
    "output_layer.weight":
        "b1758140f43a5e0f162f628e2c4878afe0ce405cd22f50216ddbb985a4e21034",
}


def formula_source(root: str) -> None:
    """The tiny source, every floating tensor set by a formula of its name and element index."""
    from megatron_grow.checkpoint import io
    from megatron_grow.models.builder import build_model_chunks
    from megatron_grow.parallel.init import initialize_distributed
    from tests.distributed.bodies import test_manifest

    initialize_distributed(ParallelConfig())
    (model,) = build_model_chunks(SOURCE_MODEL, initialize=False)
    with torch.no_grad():
        tensors = dict(model.named_parameters())
        tensors.update({n: b for n, b in model.named_buffers() if n.endswith("expert_bias")})
        for i, name in enumerate(sorted(tensors)):
            t = tensors[name]
            index = torch.arange(t.numel(), dtype=torch.float64)
            values = torch.sin(index * 0.731 + i) * (0.02 + 0.01 * (i % 7)) + (1.0 if "layernorm" in name else 0.0)
            t.copy_(values.reshape(t.shape).to(t.dtype))
    io.save_checkpoint(root, 1, io.model_sharded_state_dict([model]), test_manifest(SOURCE_MODEL))


def tensor_hash(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def strict_load_body(ckpt_root: str, parallel: ParallelConfig) -> dict:
    """Megatron-Core's own strict load of the grown checkpoint into a NaN-filled grown model."""
    from megatron_grow.growth.plan import make_growth_plan

    tensors = strict_load_into_nan_model(make_growth_plan(SOURCE_MODEL, GROWTH).target, ckpt_root, parallel)
    return {name: bool(torch.isfinite(t).all()) for name, t in tensors.items()}



@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    source = str(tmp_path_factory.mktemp("formula_source") / "ckpt")
    run_in_processes(formula_source, 1, (source,))
    roots = {}
    for name, (world, parallel) in LAYOUTS.items():
        roots[name] = str(tmp_path_factory.mktemp(name) / "grown")
        run_in_processes(grow_body, world, (source, roots[name], GROWTH, parallel))
    tensors = run_in_processes(plain_tensors_of_many, 1, (list(roots.values()),))[0]
    return roots, dict(zip(roots, tensors))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bit_identical_to_the_in_memory_growth(grown, layout):
    _, tensors = grown
    hashes = {key: tensor_hash(t) for key, t in tensors[layout].items()}
    assert sorted(hashes) == sorted(FROZEN), "the grown checkpoint stores other tensors than before"
    differ = [key for key in FROZEN if hashes[key] != FROZEN[key]]
    assert not differ, f"{len(differ)} tensors differ from the pre-streaming growth: {differ}"


def test_noise_was_applied(grown):
    """The frozen expectation is not a trivial one: copies differ from their originals."""
    _, tensors = grown
    fc1 = next(t for k, t in tensors["ep2"].items() if k.endswith("linear_fc1.weight"))
    delta = fc1[:, 8:] - fc1[:, :8]  # append layout: experts 8..15 copy 0..7
    assert delta.abs().max() > 0
    assert math.isfinite(float(delta.std()))


def test_stock_megatron_core_loads_it_strictly(grown):
    roots, _ = grown
    finite = run_in_processes(strict_load_body, 2, (roots["ep2"], LAYOUTS["ep2"][1]))
    for rank_result in finite:
        assert rank_result and all(rank_result.values()), [n for n, ok in rank_result.items() if not ok]
