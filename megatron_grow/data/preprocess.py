"""Tokenize text into Megatron-Core indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``).

Input: ``.txt``/``.txt.gz`` files, where a document is a block of non-blank lines separated
by blank lines, or ``.jsonl``/``.jsonl.gz`` files, where a document is one record's
``json_key`` string (``megatron_grow.data.text``). Several inputs go into one dataset, in
the order given. Documents that tokenize to nothing are skipped and counted.

Output, written by MCore's ``IndexedDatasetBuilder`` (the format ``IndexedDataset`` and
``GPTDataset`` read): ``PREFIX.bin`` holds the token ids of all documents back to back
(``uint16`` when the vocabulary has fewer than 65,500 ids, as MCore's
``DType.optimal_dtype`` picks, else ``int32``); ``PREFIX.idx`` holds the header
(``MMIDIDX``, version, dtype code), one sequence length and byte offset per sequence and
the document boundaries. Every document is exactly one sequence, followed by the
end-of-document id when ``append_eod`` is set (GPTDataset concatenates documents, so
training data normally wants it). Both files are written under temporary names and renamed
at the end, so an interrupted run never leaves a half-written dataset behind.

Tokenization runs in a ``multiprocessing.Pool``; each worker loads the sentencepiece model
once and encodes chunks of ``chunk_size`` documents. Results come back in input order, so
the output does not depend on the number of workers.

    megatron-grow preprocess --input data/corpus/kjv.txt.gz --tokenizer-model out/kjv.model \\
        --output-prefix out/kjv_text_document --workers 2 --append-eod
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from megatron_grow.checkpoint.paths import check_destination
from megatron_grow.data.text import check_inputs, iter_documents
from megatron_grow.data.tokenizer import Tokenizer
from megatron_grow.errors import DataError

DTYPES = ("auto", "uint16", "int32")
# MCore's DType.optimal_dtype switches to int32 from this cardinality on.
UINT16_VOCAB_LIMIT = 65500


@dataclass(frozen=True)
class PreprocessSummary:
    """What ``preprocess`` wrote."""

    output_prefix: str
    documents: int
    skipped_documents: int
    tokens: int
    seconds: float
    dtype: str

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def format(self) -> str:
        return (f"wrote {self.output_prefix}.bin/.idx: {self.documents:,} documents, {self.tokens:,} tokens "
                f"({self.dtype}), {self.skipped_documents:,} empty documents skipped, {self.seconds:.1f} s, "
                f"{self.tokens_per_second:,.0f} tokens/s")


def choose_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """The token dtype for a vocabulary; raises ``DataError`` if ``requested`` cannot hold it."""
    if requested not in DTYPES:
        raise DataError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32)
    if requested == "uint16" and vocab_size > np.iinfo(np.uint16).max + 1:
        raise DataError(f"tokenizer vocabulary has {vocab_size:,} ids; uint16 holds at most "
                        f"{np.iinfo(np.uint16).max + 1:,} (use --dtype int32 or auto)")
    return np.dtype(requested)


# Worker state: one tokenizer per process, loaded by the pool initializer.
_worker_tokenizer: Tokenizer | None = None
_worker_eod: int | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(model_file: str, append_eod: bool, dtype: str) -> None:
    global _worker_tokenizer, _worker_eod, _worker_dtype
    _worker_tokenizer = Tokenizer(model_file)
    _worker_eod = _worker_tokenizer.eod if append_eod else None
    _worker_dtype = np.dtype(dtype)


def _init_pool_worker(model_file: str, append_eod: bool, dtype: str) -> None:
    # Pool.terminate() stops workers with SIGTERM: a handler inherited from the parent (a training
    # process remembers SIGTERM to save first) would make a worker ignore it and the join hang.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    _init_worker(model_file, append_eod, dtype)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None and _worker_dtype is not None
    out = []
    for ids in _worker_tokenizer.encode_batch(texts):
        if ids and _worker_eod is not None:
            ids.append(_worker_eod)
        out.append(np.asarray(ids, dtype=_worker_dtype))
    return out


def _chunks(paths: Sequence[str], json_key: str, chunk_size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for path in paths:
        for document in iter_documents(path, json_key):
            chunk.append(document)
            if len(chunk) == chunk_size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _write_documents(builder, encoded_chunks, progress: bool | None) -> tuple[int, int, int]:
    """Add every non-empty encoded document to ``builder``; returns (documents, skipped, tokens)."""
    documents = skipped = tokens = 0
    with tqdm(desc="preprocess", unit=" docs", disable=(None if progress is None else not progress),
              mininterval=1.0) as bar:
        for chunk in encoded_chunks:
            for ids in chunk:
                if ids.size == 0:
                    skipped += 1
                    continue
                builder.add_document(ids, [ids.size])
                documents += 1
                tokens += int(ids.size)
            bar.update(len(chunk))
            bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
    return documents, skipped, tokens


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _discard_partial(builder, tmp_paths: tuple[str, ...]) -> None:
    """Close the builder's file and remove what a failed or interrupted run left; closing flushes,
    which fails again on a full disk: that failure is already being reported."""
    if not builder.data_file.closed:
        try:
            builder.data_file.close()
        except OSError:
            pass
    for tmp in tmp_paths:
        if os.path.exists(tmp):
            os.remove(tmp)


def preprocess(inputs: Sequence[str], tokenizer_model: str, output_prefix: str, *, workers: int = 1,
               append_eod: bool = False, json_key: str = "text", dtype: str = "auto", chunk_size: int = 64,
               progress: bool | None = None) -> PreprocessSummary:
    """Tokenize ``inputs`` with ``tokenizer_model`` into ``output_prefix.bin``/``.idx``.

    ``workers`` processes tokenize (1 tokenizes in this process). ``progress`` shows a tqdm
    bar on stderr (None: only when stderr is a terminal). Raises ``DataError`` for missing
    or empty input, a bad tokenizer or a dtype too small for its vocabulary. The outputs are
    written under ``.tmp`` names and renamed only when complete.
    """
    # Lazy (cost): `megatron-grow preprocess`'s parser imports this module, and Megatron-Core takes ~3-5 s.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    paths = check_inputs(inputs)
    for output in (f"{output_prefix}.bin", f"{output_prefix}.idx"):  # os.replace would overwrite an input
        check_destination(output, "--output-prefix", [("the --input file", p) for p in paths]
                          + [("the --tokenizer-model", tokenizer_model)], DataError)
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if chunk_size < 1:
        raise DataError(f"chunk size must be >= 1, got {chunk_size}")
    tokenizer = Tokenizer(tokenizer_model)
    if append_eod:
        tokenizer.eod  # noqa: B018 -- raises a clear error for a model without an end-of-sentence piece
    token_dtype = choose_dtype(tokenizer.vocab_size, dtype)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    bin_path, idx_path = get_bin_path(output_prefix), get_idx_path(output_prefix)
    tmp_bin, tmp_idx = bin_path + ".tmp", idx_path + ".tmp"

    start = time.perf_counter()
    init_args = (tokenizer.model_file, append_eod, token_dtype.name)
    pool = multiprocessing.Pool(workers, initializer=_init_pool_worker, initargs=init_args) if workers > 1 else None
    builder = IndexedDatasetBuilder(tmp_bin, dtype=token_dtype.type)
    try:
        if pool is None:
            _init_worker(*init_args)
        chunks = _chunks(paths, json_key, chunk_size)
        encoded = map(_encode_chunk, chunks) if pool is None else pool.imap(_encode_chunk, chunks)
        documents, skipped, tokens = _write_documents(builder, encoded, progress)
        if documents == 0:
            raise DataError(f"no documents with any tokens in {', '.join(paths)}"
                            + (f" ({skipped} empty documents)" if skipped else ""))
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        raise DataError(f"writing {bin_path} failed: {os.strerror(e.errno).lower()}; the partial output was "
                        "removed") from None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _discard_partial(builder, (tmp_bin, tmp_idx))
    return PreprocessSummary(output_prefix=output_prefix, documents=documents, skipped_documents=skipped,
                             tokens=tokens, seconds=time.perf_counter() - start, dtype=token_dtype.name)
