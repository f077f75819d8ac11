"""Tiny random Hugging Face MoE models, built locally with ``transformers`` (no downloads).

For the parity tests and the worked example (``scripts/hf/make_tiny_hf.py``). Weights are
drawn with a larger spread than ``transformers``' init (norm weights around 1, router and
expert-bias entries of order 1), so that routing decisions, norms and biases all matter and a
wrong mapping shows up in the logits.
"""

from __future__ import annotations

import torch
import transformers as T

from megatron_grow.interop.hf.families import FAMILIES

ARCHITECTURES = tuple(FAMILIES)


def tiny_config(architecture: str, vocab_size: int = 300, **overrides):
    """A ``transformers`` config of ``architecture`` with a few-hundred-kilobyte model.

    Args:
        architecture: a supported class name (``config.json``'s ``architectures[0]``).
        vocab_size: the vocabulary size.
        **overrides: config fields that replace the tiny defaults.

    Returns:
        The ``transformers`` config (e.g. ``Qwen3MoeConfig``): shared small sizes, then the family's
        ``tiny_config`` fields, then ``overrides``.
    """
    if architecture not in FAMILIES:
        raise ValueError(f"no tiny config for {architecture}; choose from {ARCHITECTURES}")
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    family = FAMILIES[architecture]
    return T.AutoConfig.for_model(family.model_type, **{**common, **family.tiny_config, **overrides})


@torch.no_grad()
def make_tiny_model(architecture: str, seed: int = 0, **overrides):
    """A random fp32 ``transformers`` causal LM of ``architecture`` (see the module docstring).

    Args:
        architecture: a supported class name.
        seed: the seed of its weights.
        **overrides: config fields (:func:`tiny_config`).

    Returns:
        The model, in eval mode.
    """
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
    """``make_tiny_model`` written with ``save_pretrained`` (sharded safetensors + index).

    Args:
        architecture: a supported class name.
        out_dir: the directory to write.
        seed: the seed of its weights.
        max_shard_size: ``save_pretrained``'s shard size.
        **overrides: config fields (:func:`tiny_config`).

    Returns:
        ``out_dir``.
    """
    model = make_tiny_model(architecture, seed, **overrides)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir
