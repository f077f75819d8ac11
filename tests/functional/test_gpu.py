"""GPU tier: the same model on CUDA (NCCL), local spec in bf16, and the Transformer Engine spec
when TE imports. Skipped, with the reason, on machines without CUDA."""

from __future__ import annotations

import pytest
import torch

from megatron_grow.config.schema import ModelConfig, ParallelConfig
from megatron_grow.parallel.spawn import run_in_processes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _forward_backward(use_te: bool) -> dict:
    import time

    from megatron_grow.models.builder import build_gpt_model
    from megatron_grow.models.forward import causal_attention_mask, position_ids_for
    from megatron_grow.parallel.init import initialize_distributed

    initialize_distributed(ParallelConfig())
    model_cfg = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                            kv_channels=64, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=256,
                            vocab_size=1024, seq_length=256)
    model = build_gpt_model(model_cfg, params_dtype=torch.bfloat16, use_te=use_te).cuda()
    tokens = torch.randint(0, 1024, (4, 256), device="cuda")
    mask = causal_attention_mask(256, "cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(tokens, position_ids_for(tokens), mask, labels=tokens).float().mean()
    loss.backward()
    torch.cuda.synchronize()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return {"loss": float(loss), "seconds": time.perf_counter() - start, "grads": len(grads),
            "finite": all(torch.isfinite(g).all().item() for g in grads)}


def test_local_spec_forward_backward_bf16():
    out = run_in_processes(_forward_backward, 1, (False,))[0]
    assert out["finite"] and out["grads"] > 0
    assert 6.0 < out["loss"] < 7.5  # ~ln(1024) at init
    print(out)


def test_transformer_engine_spec_forward_backward():
    pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    out = run_in_processes(_forward_backward, 1, (True,))[0]
    assert out["finite"] and out["grads"] > 0
    print(out)
