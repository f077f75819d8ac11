"""A bf16 source grows into a bf16 checkpoint (``grow --dtype auto``), noise added in fp32 and rounded once.

* The source is the tiny MoE built in bf16 (4 layers, 8 experts, sigmoid router with expert bias,
  which Megatron-Core keeps in fp32), every weight set by a closed formula, saved by ``io.save_checkpoint``.
* It is grown depth x2 then width x2 (gaussian alpha 0.01, per-layer std, seed 1234) on 2 ranks, EP=2,
  with the default dtype (``auto``), and on 1 rank with ``dtype="fp32"``.
* Every stored tensor must equal, bit for bit, ``tests/distributed/oracle.expected_grown`` applied to
  the source's stored tensors: a noised copy is ``(fp32(source) + noise).to(stored dtype)``, an exact copy
  is the source's value. Independently of the oracle: every original expert and every depth copy of a
  layer equals the source's bf16 bytes, and the stored dtypes are the source's (bf16 weights, fp32
  expert bias) for ``auto``, fp32 everywhere for ``fp32``.
* Megatron-Core's own ``dist_checkpointing.load`` with ``StrictHandling.RAISE_ALL`` loads the bf16 result
  into a grown model built in bf16, and the trainer resumes from it (EP=2), loading the bf16 weights
  into its own params dtype (fp32 on CPU), and trains two steps with finite losses.
* The bf16 result hashes (SHA-256 of dtype, shape and bytes per tensor) to ``FROZEN_BF16``, recorded from
  the code before the faster streaming path (fdbe10f).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/distributed/test_grow_bf16.py
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed import oracle
from tests.distributed.bodies import plain_tensors_of_many, strict_load_into_nan_model, train_body
from tests.distributed.conftest import write_recipe
from tests.distributed.test_grow_streaming import tensor_hash

pytestmark = pytest.mark.slow  # ~20-60 s on 2 shared cores: one save, two growths, one read, a strict load, 2 steps

RECIPE = load_recipe("configs/growth/tiny_depth_width.yaml")  # depth x2 then width x2, gaussian alpha 0.01
SOURCE_MODEL = dataclasses.replace(RECIPE.model, seq_length=32, vocab_size=512)  # the kjv tokenizer's vocabulary
GROWTH = dataclasses.replace(RECIPE.growth, width=dataclasses.replace(RECIPE.growth.width,
                                                                      noise_granularity="per_layer"))
EP2 = ParallelConfig(expert_model_parallel_size=2)
FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"

# SHA-256 of (dtype, shape, bytes) of every tensor the bf16 grow (EP=2, dtype auto) wrote for this source
# and GROWTH with the code before the single-read statistics pass and the fast save planning (commit
# fdbe10f), recorded once by running that code: the faster path writes the same bytes.
FROZEN_BF16 = {
    "decoder.final_layernorm.weight":
        "d02836ef63ed339625ae0b51aa4c61809a9005fe7b0b0cb541645a467a485f1d",
    "decoder.layers.mlp.experts.experts.linear_fc1.weight":
        "941cc2718f9ce56cffab23c0314c2543fcbe1aa0f0b23e9ce629259d6b2f53e0",
    "decoder.layers.mlp.experts.experts.linear_fc2.weight":
        "de0a994a8173e58903368015701eb563b986747077998ecfafab28749e3c632e",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight":
        "efa29ffc341f8ee65099dea3a83b36dba610af3a23502a5512c8e3c5f018ac8d",
    "decoder.layers.mlp.router.expert_bias":
        "b49b6c5708d2451a615bb4e755ccf7d175283155ad1e9454cb5949f48522367b",
    "decoder.layers.mlp.router.weight":
        "579a675db5597974d48ce64d973fc5606e2dd78d79f34f6c69c78e2b36f602ca",
    "decoder.layers.self_attention.k_layernorm.weight":
        "e6bac20ff8cb4d51d650955e0da24fb6e9bd15769bc2533fb5d2777d6505253f",
    "decoder.layers.self_attention.linear_proj.weight":
        "856d66a989b5a607424b5b82062d75212252a8916e6a260702a3a94d0c5a7dfa",
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight":
        "6e1785879c8d5033a654efca2188311061c7ef3482d99dafe92a712583d71d5a",
    "decoder.layers.self_attention.linear_qkv.weight":
        "baaa575a2b03e0dceb069088e26cb4e8cf8a1c67eb7980e43083aa2b2932ab2f",
    "decoder.layers.self_attention.q_layernorm.weight":
        "ab9389504a28c70bc2b789f2609d2436919f61064abbee6511d65c56196eebfa",
    "embedding.word_embeddings.weight":
        "4b5cc25507b4bce7cea0d55855ba8071615d146bb0d08173ff3076a3ca08b56a",
    "output_layer.weight":
        "86818b7f32ef6acdef90623b26aa601b8cbd6474280f0e083b0bd28ce1577809",
}


def bf16_source(root: str) -> None:
    """The tiny source in bf16, every floating tensor set by a formula of its name and element index."""
    from megatron_grow.checkpoint import io
    from megatron_grow.models.builder import build_model_chunks
    from megatron_grow.parallel.init import initialize_distributed
    from tests.distributed.bodies import test_manifest

    initialize_distributed(ParallelConfig())
    (model,) = build_model_chunks(SOURCE_MODEL, initialize=False, params_dtype=torch.bfloat16)
    with torch.no_grad():
        tensors = dict(model.named_parameters())
        tensors.update({n: b for n, b in model.named_buffers() if n.endswith("expert_bias")})
        for i, name in enumerate(sorted(tensors)):
            t = tensors[name]
            index = torch.arange(t.numel(), dtype=torch.float64)
            values = torch.sin(index * 0.731 + i) * (0.02 + 0.01 * (i % 7)) + (1.0 if "layernorm" in name else 0.0)
            t.copy_(values.reshape(t.shape).to(t.dtype))
    io.save_checkpoint(root, 1, io.model_sharded_state_dict([model]), test_manifest(SOURCE_MODEL))


def grow_with_dtype(source_root: str, grown_root: str, parallel: ParallelConfig, dtype: str):
    from megatron_grow.growth.grow import grow_checkpoint

    return grow_checkpoint(source_root, grown_root, GROWTH, parallel, progress=False, dtype=dtype)


def strict_load_bf16(ckpt_root: str, parallel: ParallelConfig) -> dict:
    """Megatron-Core's own strict load of the grown checkpoint into a NaN-filled grown model built in bf16."""
    from megatron_grow.growth.plan import make_growth_plan

    target = make_growth_plan(SOURCE_MODEL, GROWTH).target
    tensors = strict_load_into_nan_model(target, ckpt_root, parallel, torch.bfloat16)
    return {name: (str(t.dtype), bool(torch.isfinite(t).all())) for name, t in tensors.items()}



@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    base = tmp_path_factory.mktemp("bf16")
    roots = {name: str(base / name) for name in ("source", "auto", "fp32")}
    run_in_processes(bf16_source, 1, (roots["source"],))
    run_in_processes(grow_with_dtype, 2, (roots["source"], roots["auto"], EP2, "auto"))
    run_in_processes(grow_with_dtype, 1, (roots["source"], roots["fp32"], ParallelConfig(), "fp32"))
    tensors = run_in_processes(plain_tensors_of_many, 1, (list(roots.values()),))[0]
    return roots, dict(zip(roots, tensors))


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_bf16_source_grows_into_bf16_as_defined(grown):
    _, t = grown
    src, out = t["source"], t["auto"]
    assert src[FC1].dtype == torch.bfloat16 and src["decoder.layers.mlp.router.expert_bias"].dtype == torch.float32
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in src.items()}, "auto keeps SRC's dtypes"
    expected = oracle.expected_grown(src, GROWTH, SOURCE_MODEL.init_method_std)
    assert sorted(out) == sorted(expected)
    differ = [k for k in expected if not _bitwise_equal(out[k], expected[k])]
    assert not differ, f"differ from (fp32(source) + noise).to(bf16): {differ}"
    # Independently of the oracle: interposition j -> j // 2; experts 0..7 are the originals (exact bytes).
    for j in range(2 * SOURCE_MODEL.num_layers):
        assert _bitwise_equal(out[FC1][j, :8], src[FC1][j // 2])
        assert not torch.equal(out[FC1][j, 8:], src[FC1][j // 2]), "the copies carry noise"


def test_bf16_output_is_bit_identical_to_the_frozen_hashes(grown):
    _, t = grown
    hashes = {key: tensor_hash(v) for key, v in t["auto"].items()}
    assert sorted(hashes) == sorted(FROZEN_BF16), "the grown checkpoint stores other tensors than before"
    differ = [key for key in FROZEN_BF16 if hashes[key] != FROZEN_BF16[key]]
    assert not differ, f"{len(differ)} tensors differ from the bf16 grow of commit fdbe10f: {differ}"


def test_fp32_option_writes_fp32_of_the_same_definition(grown):
    _, t = grown
    src32 = {k: v.float() for k, v in t["source"].items()}
    out = t["fp32"]
    assert all(v.dtype == torch.float32 for v in out.values())
    expected = oracle.expected_grown(src32, GROWTH, SOURCE_MODEL.init_method_std)
    differ = [k for k in expected if not _bitwise_equal(out[k], expected[k])]
    assert not differ, f"differ from fp32(source) + noise: {differ}"


def test_stock_megatron_core_loads_the_bf16_checkpoint_strictly(grown):
    roots, _ = grown
    for rank_result in run_in_processes(strict_load_bf16, 2, (roots["auto"], EP2)):
        bad = [n for n, (_, finite) in rank_result.items() if not finite]
        assert rank_result and not bad, bad
        fc1 = [dtype for n, (dtype, _) in rank_result.items() if "experts" in n and "linear_fc1.weight" in n]
        assert fc1 and set(fc1) == {"torch.bfloat16"}


def test_training_resumes_from_the_bf16_grown_checkpoint(grown, kjv_dataset, tmp_path):
    """The trainer loads the bf16 weights into its own params dtype (fp32 on CPU) and trains on."""
    roots, _ = grown
    target = {"num_layers": 8, "num_moe_experts": 16, "moe_router_topk": 4}
    recipe = write_recipe(tmp_path / "train.yaml", kjv_dataset, tmp_path / "run", model=target,
                          training={"train_iters": 3, "lr_warmup_iters": 1},
                          checkpoint={"load": roots["auto"], "save_interval": 100},
                          parallel={"expert_model_parallel_size": 2})
    out = run_in_processes(train_body, 2, (recipe, []))[0]
    assert [i for i, _ in out["train_losses"]] == [2, 3]  # continues from the grown checkpoint's iteration 1
    assert all(math.isfinite(loss) for _, loss in out["train_losses"])


def test_capacity_check_counts_the_output_dtype(grown, monkeypatch, tmp_path):
    """The free-disk check before a grow counts 2 bytes per grown parameter for ``--dtype auto`` of a bf16
    source and 4 for ``--dtype fp32`` (the disk is set, in our own helper, to 3 bytes per parameter)."""
    from megatron_grow.errors import GrowthError
    from megatron_grow.growth import capacity
    from megatron_grow.growth.plan import make_growth_plan
    from megatron_grow.models.params import count_params

    roots, _ = grown
    params = count_params(make_growth_plan(SOURCE_MODEL, GROWTH).target).total
    monkeypatch.setattr(capacity, "machine_free_bytes", lambda save: (3 * params, None))
    ckpt_dir = os.path.join(roots["source"], "iter_0000001")
    capacity.check_capacity(SOURCE_MODEL, GROWTH, ckpt_dir, str(tmp_path / "dst"), with_verify=False)
    with pytest.raises(GrowthError, match="4 bytes per parameter"):
        capacity.check_capacity(SOURCE_MODEL, GROWTH, ckpt_dir, str(tmp_path / "dst"), with_verify=False,
                                dtype="fp32")
