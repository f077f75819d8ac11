"""A bf16 Hugging Face model imports into a bf16 checkpoint by default and exports back byte for byte.

A tiny random Qwen3-MoE built with ``transformers``' own classes (``interop/hf/tiny.py``), cast to bf16
and written with ``save_pretrained`` (sharded safetensors). ``import-hf`` with the default
``--dtype auto`` keeps bf16, reports as bytes read the stored bytes of the files' tensors (not their fp32
size), and ``export-hf --dtype auto`` writes every tensor back bitwise equal, dtype bf16. With
``--dtype fp32`` the checkpoint holds the same values in fp32.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/distributed/test_hf_bf16.py
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_grow.config.schema import ParallelConfig
from megatron_grow.interop.hf.tiny import make_tiny_model
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.hf_bodies import checkpoint_tensors, safetensors_dir

pytestmark = pytest.mark.slow  # one process: two imports and one export of a tiny model (~15 s)

ARCH = "Qwen3MoeForCausalLM"


def import_twice_and_export(hf_dir: str, work: str) -> dict:
    """Import ``hf_dir`` with the default dtype and with fp32, export the default import."""
    from megatron_grow.interop.hf.exporter import export_hf
    from megatron_grow.interop.hf.importer import import_hf

    auto = import_hf(hf_dir, f"{work}/auto", ParallelConfig(), seq_length=16, progress=False)
    fp32 = import_hf(hf_dir, f"{work}/fp32", ParallelConfig(), seq_length=16, progress=False, dtype="fp32")
    export_hf(f"{work}/auto", f"{work}/exported", max_shard_bytes=64 * 1024, progress=False)
    return {"auto_bytes_read": auto["bytes_read"], "fp32_bytes_read": fp32["bytes_read"]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_bf16")
    hf_dir = str(root / "hf")
    make_tiny_model(ARCH, seed=3).to(torch.bfloat16).save_pretrained(hf_dir, max_shard_size="200KB")
    result = run_in_processes(import_twice_and_export, 1, (hf_dir, str(root)), timeout=600)[0]
    return hf_dir, str(root), result


def test_import_then_export_is_byte_identical_in_bf16(converted):
    hf_dir, root, _ = converted
    original, exported = safetensors_dir(hf_dir), safetensors_dir(f"{root}/exported")
    assert {t.dtype for t in original.values()} == {torch.bfloat16}
    assert sorted(original) == sorted(exported)
    differ = [k for k in original if exported[k].dtype != torch.bfloat16
              or not torch.equal(original[k].view(torch.uint8), exported[k].view(torch.uint8))]
    assert not differ, differ
    stored = checkpoint_tensors(f"{root}/auto")
    assert stored[("embedding.word_embeddings.weight")].dtype == torch.bfloat16
    fc1 = next(v for k, v in stored.items() if k.endswith("experts.linear_fc1.weight"))
    assert fc1.dtype == torch.bfloat16


def test_bytes_read_are_the_files_tensor_bytes(converted):
    hf_dir, _, result = converted
    file_bytes = sum(math.prod(t.shape) * t.element_size() for t in safetensors_dir(hf_dir).values())
    assert result["auto_bytes_read"] == file_bytes
    assert result["fp32_bytes_read"] == file_bytes  # what is read does not depend on what is written


def test_fp32_option_holds_the_same_values_in_fp32(converted):
    _, root, _ = converted
    auto, fp32 = checkpoint_tensors(f"{root}/auto"), checkpoint_tensors(f"{root}/fp32")
    assert sorted(auto) == sorted(fp32)
    for k in auto:
        if auto[k].dtype == torch.bfloat16:
            assert fp32[k].dtype == torch.float32 and torch.equal(fp32[k], auto[k].float()), k
