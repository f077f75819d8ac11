"""``SafetensorsCheckpoint.read`` against safetensors' own reader: whole-row blocks (one ``readinto``) and
any other slice (through ``get_slice``) return the same values and dtype; a truncated file is one
readable error."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_grow.errors import InteropError
from megatron_grow.interop.hf.safetensors_io import SafetensorsCheckpoint

REGIONS = [(slice(None),), (slice(3, 7),), (slice(0, 1),), (slice(5, 5),), (slice(2, 6), slice(None)),
           (slice(2, 6), slice(1, 3)), (slice(None), slice(0, 2)), (slice(0, 8, 2),)]


@pytest.fixture()
def hf_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w.bf16": torch.randn(9, 4, generator=g).to(torch.bfloat16),
               "w.fp32": torch.randn(9, 4, generator=g),
               "w.3d": torch.randn(9, 2, 3, generator=g).to(torch.float16),
               "b.1d": torch.randn(9, generator=g).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return str(tmp_path)


@pytest.mark.parametrize("region", REGIONS, ids=str)
def test_reads_equal_safetensors_own(hf_dir, region):
    ck = SafetensorsCheckpoint(hf_dir)
    with safe_open(os.path.join(hf_dir, "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            r = region[:len(shape)]
            expected = f.get_slice(name)[r]
            got = ck.read(name, r)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch.equal(got.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8)), name
    ck.close()


def test_a_truncated_file_is_one_error(hf_dir):
    path = os.path.join(hf_dir, "model.safetensors")
    size = os.path.getsize(path)
    ck = SafetensorsCheckpoint(hf_dir)
    ck.read("w.bf16", (slice(None),))  # opened and validated while whole
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with open(path, "rb") as f:  # the format's header, read here from its definition
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    with pytest.raises(InteropError, match=r"model.safetensors is truncated: tensor .* needs bytes"):
        ck.read(last, (slice(None),))
