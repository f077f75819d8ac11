"""Train a sentencepiece tokenizer (BPE or unigram) on text or JSONL files.

    megatron-grow train-tokenizer --input data/corpus/kjv.txt.gz --vocab-size 4096 --model-prefix out/kjv
    megatron-grow train-tokenizer --input a.jsonl b.jsonl.gz --json-key text --vocab-size 32000 \\
        --model-type unigram --model-prefix out/tok

Writes PREFIX.model and PREFIX.vocab. Trains on lines (each non-blank line of a text file
or of a JSONL record's text), at most --input-sentence-size of them, sampled with a fixed
seed. Special ids: 0 <unk>, 1 <s>, 2 </s> (end of document), 3 <pad>, 4 newline. Same
inputs and options give the same vocabulary (unigram also needs the same --threads).
"""

from __future__ import annotations

import argparse

from megatron_grow.data.tokenizer import DEFAULT_SEED, MODEL_TYPES, train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="text (.txt[.gz]) or JSON Lines (.jsonl[.gz]) files")
    parser.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size")
    parser.add_argument("--model-prefix", required=True, metavar="OUT", help="writes OUT.model and OUT.vocab")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe",
                        help="sentencepiece algorithm (default bpe)")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text (default 'text')")
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000, metavar="N",
                        help="train on a seeded sample of at most N lines (default 2,000,000)")
    parser.add_argument("--character-coverage", type=float, default=1.0,
                        help="fraction of characters covered by the vocabulary (default 1.0)")
    parser.add_argument("--byte-fallback", action="store_true",
                        help="add 256 byte pieces so unseen characters never become <unk>")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="trainer threads (default 1; unigram results depend on it)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"sampling seed (default {DEFAULT_SEED})")


def run(args: argparse.Namespace) -> int:
    summary = train_tokenizer(args.input, args.model_prefix, args.vocab_size, model_type=args.model_type,
                              json_key=args.json_key, input_sentence_size=args.input_sentence_size,
                              character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
                              num_threads=args.threads, seed=args.seed)
    print(f"wrote {summary.model_file} and {summary.vocab_file}: {summary.model_type}, "
          f"{summary.vocab_size:,} pieces, {summary.seconds:.1f} s")
    return 0
