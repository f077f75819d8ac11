"""Forward passes through Megatron-Core's pipeline schedule, for evaluation and checks.

``forward_logits`` runs token batches through the model chunks of this rank with
``get_forward_backward_func(forward_only=True)`` (so PP, virtual PP, TP, EP and SP all
take MCore's own path) and returns the full-vocabulary logits on the last pipeline
stage, gathered over tensor-parallel ranks; other stages get ``None``.

The attention mask is always passed explicitly (bool ``[1, 1, s, s]``, True = masked):
MCore's default causal mask is built on ``"cuda"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region


def causal_attention_mask(seq_length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device).triu(1)


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    if ps.get_tensor_model_parallel_world_size() == 1:
        return logits

    return gather_from_tensor_model_parallel_region(logits)


@torch.no_grad()
def forward_logits(model_chunks: Sequence[torch.nn.Module], micro_batches: Sequence[torch.Tensor],
                   labels: Sequence[torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Logits ``[n_micro * b, s, vocab]`` (and per-token loss if labels given) on the last stage."""
    micro_batches = list(micro_batches)
    labels = list(labels) if labels is not None else None
    b, s = micro_batches[0].shape
    device = next(model_chunks[0].parameters()).device
    mask = causal_attention_mask(s, device)
    collected_logits: list[torch.Tensor] = []
    collected_losses: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        i = next(data_iterator)
        tokens = micro_batches[i].to(device)
        out = model(tokens, position_ids_for(tokens), mask)
        label_i = labels[i].to(device) if labels is not None else None

        def loss_func(output_tensor):
            # output_tensor: [b, s, vocab/tp] on the last stage.
            full = _gather_vocab(output_tensor)
            collected_logits.append(full.float().cpu())
            if label_i is not None:
                per_token = torch.nn.functional.cross_entropy(
                    full.float().flatten(0, 1), label_i.flatten(), reduction="none").view(b, s)
                collected_losses.append(per_token.cpu())
            return output_tensor.sum() * 0.0, {}

        return out, loss_func

    forward_backward = get_forward_backward_func()
    # Every stage walks the same micro-batch indices; interleaved schedules want one iterator per chunk.
    iterators = [iter(range(len(micro_batches))) for _ in model_chunks]
    forward_backward(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=list(model_chunks) if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None, None
    logits = torch.cat(collected_logits)
    losses = torch.cat(collected_losses) if collected_losses else None
    return logits, losses
