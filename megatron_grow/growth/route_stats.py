"""Calibration statistics for expert upcycling: each expert's routing share on real tokens (collective).

``megatron-grow route-stats`` loads a checkpoint in any parallel layout, runs the real model forward
on the first ``tokens`` tokens of an indexed dataset (cut into ``seq_length`` sequences, dealt
round-robin to the data-parallel ranks so every token is routed exactly once), counts per layer
how many tokens each router sent to each expert (its own routing map, ``models.routing``), sums
the counts over every rank, and writes them with the shares (``config.route_stats`` is the file
format) for ``growth.upcycle.utility_stats``.
"""

from __future__ import annotations

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_grow.checkpoint import io, keys, paths
from megatron_grow.checkpoint.architecture import resolve_architecture
from megatron_grow.config.layout_rules import model_layout_problems
from megatron_grow.config.route_stats import shares_from_counts, write_route_stats
from megatron_grow.config.schema import ModelConfig, ParallelConfig
from megatron_grow.data.datasets import check_prefixes
from megatron_grow.errors import DataError, LayoutError
from megatron_grow.models.builder import build_model_chunks
from megatron_grow.models.forward import forward_logits
from megatron_grow.models.routing import RoutingCounter
from megatron_grow.models.specs import te_available
from megatron_grow.parallel.init import initialize_distributed


def calibration_sequences(prefix: str, tokens: int, seq_length: int, groups: int) -> torch.Tensor:
    """The first ``tokens`` tokens of ``prefix`` (documents concatenated in order) as ``[n, seq_length]``.

    ``n`` is ``tokens // seq_length`` rounded down to a multiple of ``groups`` (the data-parallel
    ranks times the micro batch), so every rank runs the same number of micro batches.

    Raises:
        DataError: the dataset holds too few tokens for one sequence per group.
    """
    dataset, parts, have = IndexedDataset(prefix), [], 0
    for i in range(len(dataset)):
        if have >= tokens:
            break
        parts.append(np.asarray(dataset[i], dtype=np.int64))
        have += len(parts[-1])
    n = min(tokens, have) // seq_length // groups * groups
    if n == 0:
        raise DataError(f"--data {prefix}: {min(tokens, have)} tokens do not make {groups} sequence(s) of "
                        f"{seq_length} tokens (raise --tokens or lower --seq-length)")
    flat = np.concatenate(parts)[:n * seq_length]
    return torch.from_numpy(flat).view(n, seq_length)


def _routing_counts(model: ModelConfig, ckpt_dir: str, parallel: ParallelConfig, sequences: torch.Tensor,
                    micro_batch: int) -> torch.Tensor:
    """``[L, E]`` tokens routed to each expert, summed over every rank (this rank's DP share of ``sequences``)."""
    chunks = build_model_chunks(model, parallel, initialize=False)
    state = io.model_sharded_state_dict(chunks)
    stored = io.read_storage_metadata(ckpt_dir).state_dict_metadata.keys()
    keys.rename_for_spec(state, keys.built_spec(te_available()), keys.storage_spec(stored) or keys.LOCAL_SPEC)
    io.load_checkpoint(ckpt_dir, state)
    mine = sequences[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]
    counter = RoutingCounter(chunks)
    with torch.no_grad():
        forward_logits(chunks, list(mine.split(micro_batch)))
    return counter.gathered(model.num_layers, model.num_moe_experts)


def route_stats(load: str, prefix: str, parallel: ParallelConfig, *, tokens: int, seq_length: int | None = None,
                micro_batch: int = 1, source_model: str | ModelConfig | None = None) -> dict:
    """Per-layer routing counts and shares of checkpoint ``load`` on ``prefix``'s first ``tokens`` tokens.

    Args:
        load: checkpoint root (or an iter_N directory).
        prefix: indexed-dataset prefix (``.bin``/``.idx``).
        parallel: the layout the model is loaded in (any; the counts do not depend on it).
        tokens: calibration tokens (rounded down to whole sequences per data-parallel rank).
        seq_length: sequence length; None: the model's.
        micro_batch: sequences per forward micro batch.
        source_model: a ModelConfig or recipe path when the checkpoint records no architecture.

    Returns:
        The statistics (``config.route_stats`` format, without its ``format`` key); the same on every rank.
    """
    ckpt_dir, _ = paths.resolve_checkpoint_dir(load)
    model = resolve_architecture(ckpt_dir, source_model)[0]
    check_prefixes([prefix])  # every input is checked before the process group starts
    problems = model_layout_problems(model, parallel)
    if problems:
        raise LayoutError("route-stats: " + "; ".join(problems))
    initialize_distributed(parallel)
    seq = seq_length or model.seq_length
    sequences = calibration_sequences(prefix, tokens, seq, ps.get_data_parallel_world_size() * micro_batch)
    if int(sequences.max()) >= model.vocab_size:
        raise DataError(f"--data {prefix}: token id {int(sequences.max())} is outside the model's vocabulary "
                        f"({model.vocab_size}); tokenize with the checkpoint's tokenizer")
    counts = _routing_counts(model, ckpt_dir, parallel, sequences, micro_batch)
    rows = counts.tolist()
    return {"num_layers": model.num_layers, "num_experts": model.num_moe_experts, "topk": model.moe_router_topk,
            "tokens": int(sequences.numel()), "seq_length": seq, "checkpoint": ckpt_dir, "data": prefix,
            "counts": rows, "shares": shares_from_counts(rows)}


def write_stats(path: str, stats: dict) -> None:
    """Write ``stats`` to ``path`` from global rank 0 (atomically)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        write_route_stats(path, stats)
