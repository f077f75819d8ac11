"""Hugging Face tokenizer directories for our sentencepiece tokenizers.

``transformers`` (v5) converts a sentencepiece ``tokenizer.model`` into its ``LlamaTokenizer``;
with ``add_bos_token``/``add_eos_token`` off and ``legacy`` off it encodes exactly as
sentencepiece does for the tokenizers ``megatron-grow train-tokenizer`` writes (checked in
tests/unit/test_hf_interop_config.py), so a model trained on ``megatron-grow preprocess`` data
is evaluated on the same token ids. One difference: a character the tokenizer does not cover
is ``<unk>`` for sentencepiece and dropped by the converted tokenizer (train with
``character_coverage`` 1.0 on text that covers the evaluation text, as the default does), and
runs of several spaces tokenize differently (the shipped corpus and task have none).
"""

from __future__ import annotations

import json
import os
import shutil

from megatron_grow.errors import InteropError


def sentencepiece_to_hf_dir(model_file: str, out_dir: str) -> str:
    """Write ``tokenizer.model`` + ``tokenizer_config.json`` for ``model_file`` into ``out_dir``.

    Args:
        model_file: a SentencePiece model.
        out_dir: the directory to write (created if needed).

    Returns:
        ``out_dir``.

    Raises:
        InteropError: ``model_file`` does not exist.
    """
    if not os.path.isfile(model_file):
        raise InteropError(f"tokenizer {model_file} does not exist")
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy2(model_file, os.path.join(out_dir, "tokenizer.model"))
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
              "legacy": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return out_dir
