"""Tiny random Hugging Face MoE models, built locally with ``transformers`` (no downloads).

For the parity tests and the worked example (``scripts/hf/make_tiny_hf.py``). Weights are
drawn with a larger spread than ``transformers``' init (norm weights around 1, router and
expert-bias entries of order 1), so that routing decisions, norms and biases all matter and a
wrong mapping shows up in the logits.
"""

from __future__ import annotations

import torch

ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM",
                 "Glm4MoeForCausalLM")


def tiny_config(architecture: str, vocab_size: int = 300, **overrides):
    """A ``transformers`` config of ``architecture`` with a few-hundred-kilobyte model."""
    import transformers as T

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if architecture == "Qwen3MoeForCausalLM":
        cfg = dict(common, head_dim=16, num_experts=8, moe_intermediate_size=32, intermediate_size=96,
                   norm_topk_prob=True, rope_theta=1000000.0)
        return T.Qwen3MoeConfig(**{**cfg, **overrides})
    if architecture == "MixtralForCausalLM":
        cfg = dict(common, num_local_experts=8, intermediate_size=32, sliding_window=None)
        return T.MixtralConfig(**{**cfg, **overrides})
    if architecture == "OlmoeForCausalLM":
        cfg = dict(common, num_experts=8, intermediate_size=32, norm_topk_prob=False, clip_qkv=None)
        return T.OlmoeConfig(**{**cfg, **overrides})
    if architecture == "Qwen2MoeForCausalLM":
        cfg = dict(common, num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                   intermediate_size=96, norm_topk_prob=False)
        return T.Qwen2MoeConfig(**{**cfg, **overrides})
    if architecture == "Glm4MoeForCausalLM":
        cfg = dict(common, head_dim=16, n_routed_experts=8, moe_intermediate_size=32, intermediate_size=96,
                   n_shared_experts=0, first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=True,
                   routed_scaling_factor=2.5, use_qk_norm=True, partial_rotary_factor=1.0, attention_bias=False)
        return T.Glm4MoeConfig(**{**cfg, **overrides})
    raise ValueError(f"no tiny config for {architecture}; choose from {ARCHITECTURES}")


@torch.no_grad()
def make_tiny_model(architecture: str, seed: int = 0, **overrides):
    """A random fp32 ``transformers`` causal LM of ``architecture`` (see the module docstring)."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(architecture, **overrides), dtype=torch.float32)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif p.numel():
            p.copy_(torch.randn_like(p) * (0.5 if name.endswith("gate.weight") else 0.08))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn_like(b))
    return model.eval()


def save_tiny_model(architecture: str, out_dir: str, seed: int = 0, max_shard_size: str = "200KB",
                    **overrides) -> str:
    """``make_tiny_model`` written with ``save_pretrained`` (sharded safetensors + index)."""
    model = make_tiny_model(architecture, seed, **overrides)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir
