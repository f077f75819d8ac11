"""The data side of training: corpus text -> sentencepiece tokenizer -> indexed datasets -> batches.

- ``text``: read ``.txt``/``.jsonl`` (optionally ``.gz``) into documents or lines.
- ``tokenizer``: train a sentencepiece model; ``Tokenizer`` loads one.
- ``preprocess``: tokenize documents in parallel into MCore ``.bin``/``.idx`` datasets.
- ``datasets``: MCore ``GPTDataset``/``BlendedDataset`` splits and the resumable per-rank batch iterator.
- ``heldout``: hold whole books of the shipped Bible out of the training text (for ``kjv_heldout_cloze``).
- ``helpers``: make sure MCore's compiled dataset index helpers are importable.

Heavy imports (torch, megatron.core) happen inside the functions that need them, so this
package and the tokenizer CLI stay quick to import.
"""

from megatron_grow.errors import DataError

__all__ = ["DataError"]
