"""Tokenize text or JSONL into Megatron-Core indexed datasets (PREFIX.bin + PREFIX.idx).

    megatron-grow train-tokenizer --input data/corpus/kjv.txt.gz --vocab-size 4096 --model-prefix out/kjv
    megatron-grow preprocess --input data/corpus/kjv.txt.gz --tokenizer-model out/kjv.model \\
        --output-prefix out/kjv_text_document --workers 2 --append-eod
    megatron-grow preprocess --input part1.jsonl.gz part2.jsonl --json-key text \\
        --tokenizer-model tok.model --output-prefix out/web --append-eod

A document is a blank-line-separated block of lines (.txt, .txt.gz) or one JSONL record's
--json-key string (.jsonl, .jsonl.gz); each becomes one sequence, with the end-of-document
id appended under --append-eod (what GPT pretraining wants). All inputs go into one
dataset, in order; the result does not depend on --workers. Prints a summary: documents,
tokens, seconds, tokens/s. Use the prefix in a recipe's data.data_path.
"""

from __future__ import annotations

import argparse
import os

from megatron_grow.data.preprocess import DTYPES, preprocess


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="text (.txt[.gz]) or JSON Lines (.jsonl[.gz]) files")
    parser.add_argument("--tokenizer-model", required=True, metavar="M.model", help="sentencepiece model")
    parser.add_argument("--output-prefix", required=True, metavar="OUT", help="writes OUT.bin and OUT.idx")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="tokenizer processes (default: CPU count, at most 8)")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document id")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text (default 'text')")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="token dtype in .bin (default auto: uint16 below 65,500 ids, else int32)")
    parser.add_argument("--chunk-size", type=int, default=64, metavar="N", help="documents per worker task")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    summary = preprocess(args.input, args.tokenizer_model, args.output_prefix, workers=args.workers,
                         append_eod=args.append_eod, json_key=args.json_key, dtype=args.dtype,
                         chunk_size=args.chunk_size, progress=False if args.no_progress else None)
    print(summary.format())
    return 0
