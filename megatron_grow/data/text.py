"""Read raw training text: plain text or JSON Lines, optionally gzip-compressed.

Input formats, chosen by file name (a trailing ``.gz`` means gzip, read as a stream):

- ``*.txt`` (and any other name that is not JSON Lines): UTF-8 text. A **document** is a
  block of consecutive non-blank lines; one or more blank (whitespace-only) lines separate
  documents. Inside a document the lines are joined with ``"\\n"`` and trailing whitespace
  is stripped from each line. The shipped corpus ``data/corpus/kjv.txt.gz`` has one
  chapter per block.
- ``*.jsonl`` / ``*.json``: one JSON object per line; the document is the string under
  ``json_key`` (default ``"text"``). Blank lines are skipped; a record whose text is empty
  counts as an empty document and is skipped by the callers.

Tokenizer training (``megatron_grow.data.tokenizer``) reads *lines* instead of documents:
each non-blank line of a text file, and each non-blank line of each JSONL record's text.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import IO

from megatron_grow.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json")


def is_jsonl(path: str) -> bool:
    """True for ``*.jsonl``, ``*.json`` and their ``.gz`` forms."""
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith(JSONL_SUFFIXES)


def check_inputs(paths: Sequence[str]) -> list[str]:
    """The input paths, after checking that there is at least one and each is a readable file."""
    if not paths:
        raise DataError("no input files given")
    folders = [p for p in paths if os.path.isdir(p)]
    if folders:
        raise DataError(f"input {', '.join(folders)} is a directory; give the text (.txt[.gz]) or JSON Lines "
                        "(.jsonl[.gz]) files themselves (e.g. DIR/*.txt)")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"input file(s) not found: {', '.join(missing)}")
    return list(paths)


def open_text(path: str) -> IO[str]:
    """Open ``path`` for reading as UTF-8 text, decompressing ``.gz`` on the fly."""
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _json_text(line: str, path: str, line_no: int, json_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or json_key not in record:
        raise DataError(f"{path}:{line_no}: record has no key {json_key!r} (use --json-key to pick another)")
    text = record[json_key]
    if not isinstance(text, str):
        raise DataError(f"{path}:{line_no}: {json_key!r} is {type(text).__name__}, expected a string")
    return text


def iter_documents(path: str, json_key: str = "text") -> Iterator[str]:
    """Yield the documents of one file (see the module docstring for what a document is)."""
    try:
        with open_text(path) as f:
            if is_jsonl(path):
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        yield _json_text(line, path, line_no, json_key)
                return
            block: list[str] = []
            for line in f:
                line = line.rstrip()
                if line:
                    block.append(line)
                elif block:
                    yield "\n".join(block)
                    block = []
            if block:
                yield "\n".join(block)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({e})") from None


def iter_lines(path: str, json_key: str = "text") -> Iterator[str]:
    """Yield the non-blank lines of one file (of each record's text for JSON Lines)."""
    for document in iter_documents(path, json_key):
        for line in document.split("\n"):
            line = line.rstrip()
            if line:
                yield line
