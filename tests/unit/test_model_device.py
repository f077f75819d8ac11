"""Every model the project builds lands whole on the device Megatron-Core targets.

On a GPU, MCore's layers allocate on ``torch.cuda.current_device()`` while a module that calls a
tensor factory with no device lands on the process default, the CPU: only the trainer moved the
built model afterwards, so every other GPU user of a built model (``growth/verify.py``, growth,
the HF importer, the GPU benchmark) met "tensors on different devices". On a CPU machine the GPU
case is reproduced with a device that is not the CPU: MCore is told that its device is ``meta``
(what ``torch.cuda.current_device()`` answers, and no CPU initialisation), the process default
stays the CPU, and no parameter or buffer may be left anywhere but on ``meta``.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state as ps

from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.models.builder import build_gpt_model, build_model_chunks
from megatron_grow.parallel.init import initialize_distributed

TARGET = torch.device("meta")


@pytest.fixture
def mcore_targets_meta(monkeypatch):
    """MCore's GPU path (``use_cpu_initialization`` off, weights on the current device), the device
    being ``meta``; the process default device stays the CPU, as on a GPU machine."""
    if not ps.model_parallel_is_initialized():
        initialize_distributed(ParallelConfig())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: TARGET)


def _misplaced(chunks) -> list[str]:
    out = []
    for i, chunk in enumerate(chunks):
        for kind, named in (("parameter", chunk.named_parameters()), ("buffer", chunk.named_buffers())):
            out += [f"chunk {i} {kind} {name} on {t.device}" for name, t in named if t.device != TARGET]
    return out


# The model variants the recipes use: both expert backends, QK-norm per head and across heads
# (OLMoE), LayerNorm; and the build calls of each user (kwargs as each passes them).
VARIANTS = {
    "sequential": [],
    "grouped_mm": ["model.moe_expert_backend=grouped_mm"],
    "qk_norm": ["model.qk_layernorm=true"],
    "qk_norm_across_heads": ["model.qk_layernorm=true", "model.qk_layernorm_across_heads=true"],
    "layernorm": ["model.normalization=LayerNorm"],
}
USERS = {
    "trainer": dict(params_dtype=torch.bfloat16, initialize=True),  # training/trainer.py
    # growth/verify.py and interop/hf/importer.py (export reads checkpoint tensors, builds no model)
    "verify_and_import": dict(initialize=False),
    "benchmark": dict(params_dtype=torch.bfloat16),  # benchmarks/gpu_bench.py (build_gpt_model)
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("user", sorted(USERS))
def test_every_parameter_and_buffer_is_on_the_target_device(mcore_targets_meta, variant, user):
    model = load_recipe("configs/models/tiny.yaml", VARIANTS[variant]).model
    kwargs = USERS[user]
    if user == "benchmark":
        chunks = [build_gpt_model(model, **kwargs)]
    else:
        chunks = build_model_chunks(model, ParallelConfig(), **kwargs)
    assert not _misplaced(chunks), _misplaced(chunks)


def test_growth_build_on_meta_stays_on_meta(mcore_targets_meta):
    """growth/grow.py builds the target with ``meta=True`` (every weight streamed from the source)."""
    model = load_recipe("configs/models/tiny.yaml", ["model.qk_layernorm=true"]).model
    assert not _misplaced(build_model_chunks(model, ParallelConfig(), meta=True))
