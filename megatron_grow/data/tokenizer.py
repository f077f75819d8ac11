"""Train and load sentencepiece tokenizers.

On disk a tokenizer is one sentencepiece model file, ``PREFIX.model`` (a serialized
``ModelProto``: pieces with scores, the normalizer and the full trainer spec, so the file
documents how it was trained), plus ``PREFIX.vocab`` (one ``piece<TAB>score`` line per id,
for reading only). Models trained here have fixed special ids:

    0 <unk>   1 <s> (bos)   2 </s> (eos, used as end-of-document)   3 <pad>   4 "\\n"

Newline is a user-defined piece and normalization is ``identity`` without whitespace
folding, so ``decode(encode(text)) == text`` for text made of characters the model covers
(everything, with ``byte_fallback``). Training is deterministic: sentencepiece's random
generator is seeded (it samples ``input_sentence_size`` lines when the input has more) and
the thread count is fixed (BPE does not depend on it; unigram does, so keep ``num_threads``
when reproducing a model).

Any existing sentencepiece model works with :class:`Tokenizer` as long as it defines an
end-of-sentence piece (used as end-of-document).

    megatron-grow train-tokenizer --input data/corpus/kjv.txt.gz --vocab-size 4096 --model-prefix out/kjv
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sentencepiece as spm

from megatron_grow.data.text import check_inputs, iter_lines
from megatron_grow.errors import DataError

MODEL_TYPES = ("bpe", "unigram")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NEWLINE_PIECE = "\n"
DEFAULT_SEED = 1234


@dataclass(frozen=True)
class TokenizerTrainingSummary:
    """What ``train_tokenizer`` produced."""

    model_file: str
    vocab_file: str
    vocab_size: int
    model_type: str
    seconds: float


def _line_stream(paths: Sequence[str], json_key: str) -> Iterator[str]:
    for path in paths:
        yield from iter_lines(path, json_key)


def train_tokenizer(inputs: Sequence[str], model_prefix: str, vocab_size: int, *, model_type: str = "bpe",
                    json_key: str = "text", input_sentence_size: int = 2_000_000,
                    character_coverage: float = 1.0, byte_fallback: bool = False, num_threads: int = 1,
                    seed: int = DEFAULT_SEED) -> TokenizerTrainingSummary:
    """Train a sentencepiece model on the lines of ``inputs``; writes ``model_prefix.{model,vocab}``.

    ``input_sentence_size`` bounds memory and time: sentencepiece keeps a seeded random sample
    of that many lines when the input has more. Raises ``DataError`` for missing or empty input
    and for a vocabulary size sentencepiece refuses (it says which sizes would work).
    """
    paths = check_inputs(inputs)
    if model_type not in MODEL_TYPES:
        raise DataError(f"model type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    specials = 4 + 1 + (256 if byte_fallback else 0)
    if vocab_size <= specials:
        raise DataError(f"vocab size {vocab_size} leaves no room for learned pieces: {specials} ids are taken by "
                        "<unk> <s> </s> <pad> and newline" + (" plus 256 byte pieces" if byte_fallback else ""))
    if input_sentence_size < 1:
        raise DataError(f"input sentence size must be >= 1, got {input_sentence_size}")
    if not 0.0 < character_coverage <= 1.0:
        raise DataError(f"character coverage must be in (0, 1], got {character_coverage}")
    if num_threads < 1:
        raise DataError(f"threads must be >= 1, got {num_threads}")

    lines = _line_stream(paths, json_key)
    try:
        first = next(lines)
    except StopIteration:
        raise DataError(f"no text in {', '.join(paths)}") from None

    def all_lines() -> Iterator[str]:
        yield first
        yield from lines

    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    options: dict[str, Any] = dict(
        model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, byte_fallback=byte_fallback,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        user_defined_symbols=[NEWLINE_PIECE],
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        num_threads=num_threads, minloglevel=2,
    )
    start = time.perf_counter()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=all_lines(), **options)
    except RuntimeError as e:
        # e.g. "Vocabulary size too high (5000). Please set it to a value <= 3115."
        raise DataError(f"sentencepiece refused to train: {str(e).strip()}") from None
    seconds = time.perf_counter() - start
    return TokenizerTrainingSummary(model_file=model_prefix + ".model", vocab_file=model_prefix + ".vocab",
                                    vocab_size=vocab_size, model_type=model_type, seconds=seconds)


class Tokenizer:
    """A sentencepiece model: encode/decode, its vocabulary size and special ids.

    ``eod`` is the model's end-of-sentence id; ``pad`` its pad id (-1 when it has none).
    ``to_mcore()`` gives the same model behind Megatron-Core's tokenizer abstraction
    (``megatron.core.tokenizers.MegatronTokenizer``, sentencepiece library), which is what
    ``GPTDatasetConfig.tokenizer`` expects.
    """

    def __init__(self, model_file: str) -> None:
        if not os.path.isfile(model_file):
            raise DataError(f"tokenizer model not found: {model_file}")
        self.model_file = os.path.abspath(model_file)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_file)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{model_file}: not a sentencepiece model ({str(e).strip()})") from None
        self._mcore = None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        eos = self._sp.eos_id()
        if eos < 0:
            raise DataError(f"tokenizer {self.model_file} has no end-of-sentence piece to use as end-of-document; "
                            "train one with `megatron-grow train-tokenizer`")
        return eos

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def to_mcore(self) -> Any:
        """This model as a ``megatron.core.tokenizers`` tokenizer (built once, then cached)."""
        if self._mcore is None:
            # Lazy (cost): `megatron-grow train-tokenizer`'s parser imports this module; Megatron-Core takes ~3-5 s.
            from megatron.core.tokenizers import MegatronTokenizer

            self._mcore = MegatronTokenizer.from_pretrained(
                tokenizer_path=self.model_file, metadata_path={"library": "sentencepiece", "model_type": "gpt"})
        return self._mcore

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_file!r}, vocab_size={self.vocab_size})"


def load_tokenizer(model_file: str) -> Tokenizer:
    """Load a sentencepiece ``.model`` file; raises ``DataError`` if it is missing or not a model."""
    return Tokenizer(model_file)
