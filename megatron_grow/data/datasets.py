"""Training, validation and test datasets from indexed data, and the resumable batch iterator.

Datasets: ``data.data_path`` names indexed datasets by prefix (``PREFIX.bin`` + ``PREFIX.idx``,
written by ``megatron-grow preprocess``), either ``[prefix, ...]`` (blend weighted by
dataset size) or ``[weight, prefix, weight, prefix, ...]``. Megatron-Core's
``BlendedMegatronDatasetBuilder`` splits every prefix's documents by ``data.split``
(e.g. ``"98,1,1"``), builds one ``GPTDataset`` per prefix and split (samples of
``model.seq_length`` tokens plus one, shuffled with ``training.seed``) and blends them with
``BlendedDataset``. Sizes follow Megatron-LM: train ``train_iters * global_batch_size``
samples, valid ``(train_iters // eval_interval + 1) * eval_iters * global_batch_size``, test
``eval_iters * global_batch_size``. MCore sizes a split's shuffled sample index by its sample
count (the number of epochs it spans), so the validation samples change with ``train_iters``;
``data.eval_samples`` fixes the validation count instead, and runs of different lengths set to
the same value are evaluated on the same tokens. The document/sample/shuffle indices (``.npy``) and blend
indices are cached in ``cache_dir`` (default: ``index_cache/`` next to the first prefix, or
``$XDG_CACHE_HOME/megatron_grow/index_cache`` when that is not writable), keyed by an MD5
of everything that determines them, so every rank and every restart sees the same samples.

Batches: sample ``i`` of the run is dataset index ``consumed_samples + i`` (Megatron-LM's
``MegatronPretrainingSampler``). One global micro-batch step covers
``micro_batch_size * dp_size`` consecutive indices; data-parallel rank ``r`` takes the
``r``-th slice of ``micro_batch_size``. A run that stopped after ``consumed_samples``
samples continues exactly where it stopped by starting a new iterator there. Each batch is
a dict of tensors ``tokens``, ``labels`` (``[micro_batch_size, seq_length]`` int64),
``loss_mask`` (float), ``position_ids`` and, only with ``create_attention_mask``,
``attention_mask`` (``[micro_batch_size, 1, seq_length, seq_length]`` bool, True = masked).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_grow.config.schema import DataConfig, ModelConfig, TrainingConfig
from megatron_grow.data.helpers import ensure_dataset_helpers
from megatron_grow.data.tokenizer import Tokenizer
from megatron_grow.errors import DataError

SPLIT_NAMES = ("train", "valid", "test")


class SplitDatasets(NamedTuple):
    """One dataset (or None where the split's weight is zero) per split."""

    train: Any
    valid: Any
    test: Any


def _as_weight(item: Any) -> float | None:
    if isinstance(item, bool):
        return None
    if isinstance(item, (int, float)):
        return float(item)
    try:
        return float(str(item))
    except ValueError:
        return None


def parse_data_path(data_path: Sequence[Any] | str) -> tuple[list[str], list[float] | None]:
    """``[prefix, ...]`` or ``[weight, prefix, weight, prefix, ...]`` -> (prefixes, weights or None)."""
    items = data_path.split() if isinstance(data_path, str) else list(data_path)
    if not items:
        raise DataError("data.data_path is empty: give at least one dataset prefix (made by megatron-grow preprocess)")
    weights = [_as_weight(x) for x in items]
    if all(w is None for w in weights):
        return [str(x) for x in items], None
    pairs_ok = len(items) % 2 == 0 and all(
        weights[i] is not None and weights[i + 1] is None for i in range(0, len(items), 2))
    if not pairs_ok:
        raise DataError(f"data.data_path must be [prefix, ...] or [weight, prefix, weight, prefix, ...], "
                        f"got {items}")
    w = [weights[i] for i in range(0, len(items), 2)]
    bad = [x for x in w if not x > 0 or not np.isfinite(x)]
    if bad:
        raise DataError(f"data.data_path weights must be positive, got {w}")
    return [str(items[i]) for i in range(1, len(items), 2)], w


def check_prefixes(prefixes: Sequence[str]) -> None:
    """Raise ``DataError`` naming every missing ``.bin``/``.idx`` file."""
    problems = []
    for prefix in prefixes:
        if prefix.endswith((".bin", ".idx")):
            problems.append(f"{prefix}: give the dataset prefix without .bin/.idx ({prefix[:-4]})")
            continue
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            problems.append(f"dataset prefix {prefix!r}: missing {' and '.join(missing)} "
                            "(make them with megatron-grow preprocess)")
            continue
        problem = _dataset_content_problem(prefix)
        if problem:
            problems.append(f"dataset prefix {prefix!r}: {problem}")
    if problems:
        raise DataError("; ".join(problems))


def _dataset_content_problem(prefix: str) -> str | None:
    """Why the indexed dataset at ``prefix`` cannot be trained on (empty or unreadable), or None."""
    empty = [prefix + ext for ext in (".bin", ".idx") if os.path.getsize(prefix + ext) == 0]
    if empty:
        return f"{' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty (no tokens to train on)"
    try:
        dataset = IndexedDataset(prefix)
        documents, tokens = len(dataset), int(np.sum(dataset.sequence_lengths))
    except Exception as e:  # MCore raises assorted errors (AssertionError, ValueError...) for a damaged file
        return f"{prefix}.idx is unreadable ({type(e).__name__}: {str(e).strip()[:200]})"
    if documents == 0 or tokens == 0:
        return f"the dataset holds no tokens ({documents} documents)"
    return None


def parse_split(split: str) -> list[float]:
    """``"98,1,1"`` -> normalized ``[0.98, 0.01, 0.01]``; missing trailing parts are 0."""
    try:
        parts = [float(p) for p in str(split).replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 or not np.isfinite(p) for p in parts) or sum(parts) <= 0:
        raise DataError(f"data.split must be up to three non-negative numbers 'train,valid,test' with a positive "
                        f"sum, got {split!r}")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_sizes(training: TrainingConfig, eval_samples: int | None = None) -> list[int]:
    """Samples per split: Megatron-LM's train/valid/test sample counts, except that ``eval_samples``
    (``data.eval_samples``), when given, fixes the validation count whatever ``train_iters`` is."""
    gbs = training.global_batch_size
    valid = eval_samples if eval_samples is not None else \
        (training.train_iters // training.eval_interval + 1) * training.eval_iters * gbs
    return [training.train_iters * gbs, valid, training.eval_iters * gbs]


def check_tokenizer(tokenizer: Tokenizer, model: ModelConfig) -> None:
    """The model's embedding must cover every id the tokenizer produces."""
    if model.vocab_size < tokenizer.vocab_size:
        raise DataError(f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's vocabulary "
                        f"({tokenizer.vocab_size} ids in {tokenizer.model_file}); set model.vocab_size to at "
                        f"least {tokenizer.vocab_size}")


def _check_index(prefix: str, split: list[float], tokenizer: Tokenizer) -> None:
    """Refuse datasets MCore would mis-handle: wrong dtype, and splits without tokens (MCore loops forever)."""
    index = IndexedDataset(prefix)
    dtype = np.dtype(index.index.dtype)
    if tokenizer.vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"{prefix}.idx stores {dtype.name} tokens but the tokenizer has {tokenizer.vocab_size} ids: "
                        "it was made with a different tokenizer; run megatron-grow preprocess again")
    lengths = index.sequence_lengths
    n = lengths.shape[0]
    # The same book-ends and rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
    for name, bookends in zip(SPLIT_NAMES, convert_split_vector_to_split_matrix(split)):
        if bookends is None:
            continue
        beg, end = int(round(bookends[0] * float(n))), int(round(bookends[1] * float(n)))
        if end <= beg or int(lengths[beg:end].sum()) == 0:
            raise DataError(f"dataset {prefix!r} has {n} document(s); data.split gives its {name} split "
                            f"{end - beg} of them{' with no tokens' if end > beg else ''}: use more data or a "
                            f"split that leaves {name} at 0 (e.g. data.split=100,0,0)")


def default_cache_dir(prefixes: Sequence[str]) -> str:
    """``index_cache/`` next to the first dataset, or the user cache when that directory is read-only."""
    data_dir = os.path.dirname(os.path.abspath(prefixes[0]))
    if os.access(data_dir, os.W_OK):
        return os.path.join(data_dir, "index_cache")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_grow", "index_cache")


def build_dataset_config(data: DataConfig, model: ModelConfig, training: TrainingConfig, tokenizer: Tokenizer, *,
                         cache_dir: str | None = None, create_attention_mask: bool = False) -> Any:
    """Validate the data section against the files and the tokenizer; return MCore's ``GPTDatasetConfig``."""
    prefixes, weights = parse_data_path(data.data_path)
    check_prefixes(prefixes)
    split = parse_split(data.split)
    check_tokenizer(tokenizer, model)
    for prefix in dict.fromkeys(prefixes):
        _check_index(prefix, split, tokenizer)
    cache = os.path.abspath(cache_dir or default_cache_dir(prefixes))
    os.makedirs(cache, exist_ok=True)
    return GPTDatasetConfig(
        random_seed=training.seed,
        sequence_length=model.seq_length,
        blend=([os.path.abspath(p) for p in prefixes], weights),
        split=str(data.split).replace("/", ","),
        path_to_cache=cache,
        tokenizer=tokenizer.to_mcore(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
    )


def build_datasets(data: DataConfig, model: ModelConfig, training: TrainingConfig, tokenizer: Tokenizer, *,
                   cache_dir: str | None = None, create_attention_mask: bool = False,
                   is_built_on_rank: Callable[[], bool] = lambda: True) -> SplitDatasets:
    """Build the train/valid/test ``GPTDataset``/``BlendedDataset`` splits (see the module docstring).

    Call on every rank when ``torch.distributed`` is initialized: MCore builds the index
    caches on rank 0 first and synchronizes with barriers. Ranks where ``is_built_on_rank()``
    is False get None for every split.
    """
    config = build_dataset_config(data, model, training, tokenizer, cache_dir=cache_dir,
                                  create_attention_mask=create_attention_mask)
    ensure_dataset_helpers()
    sizes = split_sizes(training, data.eval_samples)
    if sizes[0] == 0:
        raise DataError("training.train_iters is 0: there is no training data to build")
    builder_cls = BlendedMegatronDatasetBuilder if torch.distributed.is_initialized() else _single_process_builder()
    train, valid, test = builder_cls(GPTDataset, sizes, is_built_on_rank, config).build()
    if data.eval_seed is not None and data.eval_seed != training.seed:
        # A second build whose sample order follows eval_seed; only its validation and test splits are
        # kept (its train split, one sample, is built because MCore builds every split it is given).
        eval_config = build_dataset_config(data, model, dataclasses.replace(training, seed=data.eval_seed),
                                           tokenizer, cache_dir=cache_dir, create_attention_mask=create_attention_mask)
        _, valid, test = builder_cls(GPTDataset, [1, sizes[1], sizes[2]], is_built_on_rank, eval_config).build()
    return SplitDatasets(train, valid, test)


def _single_process_builder() -> type:
    """MCore's builder, except that blends are not cached when ``torch.distributed`` is not initialized.

    ``BlendedDataset._build_indices`` (MCore 0.16.1) calls ``torch.distributed.get_rank()``
    on a cache miss whenever ``path_to_cache`` is set, which fails in a single process
    without a process group (``GPTDataset`` checks ``is_initialized()`` first). Without a
    cache it builds its blending index in memory with the same deterministic C++ helper, so
    the samples are the same; only that small index is recomputed on every start.
    """
    class SingleProcessBuilder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset:
                *head, config = args
                config = copy.copy(config)
                config.path_to_cache = None
                # Silence its "Cannot save the BlendedDataset indexes" warning: expected here.
                blend_logger = logging.getLogger(BlendedDataset.__module__)
                level = blend_logger.level
                blend_logger.setLevel(logging.ERROR)
                try:
                    return BlendedMegatronDatasetBuilder.build_generic_dataset(
                        cls, is_built_on_rank, synchronize_ranks, *head, config)
                finally:
                    blend_logger.setLevel(level)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)

    return SingleProcessBuilder


class PretrainingBatchSampler:
    """Index batches for one data-parallel rank, starting at global sample ``consumed_samples``.

    Global micro-batch step ``k`` covers indices ``consumed_samples + k * micro_batch_size *
    dp_size`` onwards; rank ``dp_rank`` gets ``micro_batch_size`` of them at offset
    ``dp_rank * micro_batch_size``. A final partial step is dropped (every rank must take the
    same number of steps).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int) -> None:
        if micro_batch_size < 1 or dp_size < 1:
            raise DataError(f"micro batch size ({micro_batch_size}) and data-parallel size ({dp_size}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        if consumed_samples < 0:
            raise DataError(f"consumed samples must be >= 0, got {consumed_samples}")
        if consumed_samples > total_samples:
            raise DataError(f"consumed samples ({consumed_samples}) exceed the dataset ({total_samples} samples): "
                            "the run asks for more data than was built for it")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def step_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.step_size

    def __iter__(self) -> Iterator[list[int]]:
        offset = self.dp_rank * self.micro_batch_size
        for step in range(len(self)):
            start = self.consumed_samples + step * self.step_size + offset
            yield list(range(start, start + self.micro_batch_size))


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack per-sample tensors into a batch; drops BlendedDataset's ``dataset_id``."""
    keys = [k for k in samples[0] if k != "dataset_id"]
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}


def make_batch_iterator(dataset: Any, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, *,
                        num_workers: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Micro batches for data-parallel rank ``dp_rank``, resuming at ``consumed_samples``."""
    if dataset is None:
        raise DataError("no dataset to iterate over (its split weight is 0, or it is not built on this rank)")
    sampler = PretrainingBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    # Its own generator: creating a DataLoader iterator otherwise draws a worker base seed from the
    # *global* torch RNG, so a resumed run (which builds its iterators after restoring the RNG state)
    # would draw every dropout mask one step off from the uninterrupted run. Batches do not depend on it.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=collate_samples, pin_memory=torch.cuda.is_available(),
                                         persistent_workers=False, generator=torch.Generator().manual_seed(0))
    return iter(loader)
