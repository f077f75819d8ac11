"""Hold whole books of the shipped King James Bible out of training, for a downstream task on unseen text.

A cloze task drawn from the training text measures memorisation (a run that has seen a verse twice
completes it better than one that has seen it half a time). The held-out task
``data/eval/kjv_heldout_cloze`` is drawn only from :data:`HELDOUT_BOOKS`; a study that scores it
must train its tokenizer and model on :func:`write_training_text`'s output, the corpus without
those books.

Format assumed (``data/corpus/README.md``): one document per chapter, separated by a blank line;
a document's first line is its heading ``<Book> <chapter>`` (``1 Samuel 3``, ``Song of Solomon 2``),
then one line per verse ``<number> <text>``.

Overlap is judged on :func:`word_string` (lower case, letters only, single spaces), so punctuation,
case, verse numbers and line breaks cannot hide a repeated passage.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterable, Sequence

from megatron_grow.data.text import iter_documents
from megatron_grow.errors import DataError

# Six books from four genres, ~4.7% of the text (200k of 4.23M characters, 1,123 verses of 12-40 words):
# narrative (Ruth, Esther), wisdom (Ecclesiastes), prophecy (Daniel), epistles (Romans, James).
HELDOUT_BOOKS = ("Ruth", "Esther", "Ecclesiastes", "Daniel", "Romans", "James")


def book_of(document: str) -> str:
    """The book a chapter document belongs to: its heading without the chapter number."""
    heading = document.split("\n", 1)[0].strip()
    book, _, chapter = heading.rpartition(" ")
    if not book or not chapter.isdigit():
        raise DataError(f"chapter heading {heading[:60]!r} is not '<Book> <chapter>'")
    return book


def split_books(documents: Iterable[str], heldout_books: Sequence[str] = HELDOUT_BOOKS
                ) -> tuple[list[str], list[str]]:
    """The chapter documents split into (training, held out), each in corpus order.

    Raises DataError naming any held-out book that has no chapter in ``documents`` (a misspelt
    name would otherwise hold nothing out)."""
    wanted = set(heldout_books)
    train, held = [], []
    for doc in documents:
        (held if book_of(doc) in wanted else train).append(doc)
    missing = sorted(wanted - {book_of(d) for d in held})
    if missing:
        raise DataError(f"held-out book(s) {', '.join(missing)} not found in the corpus")
    return train, held


def write_training_text(source: str, destination: str, heldout_books: Sequence[str] = HELDOUT_BOOKS) -> dict:
    """Write ``source`` without the held-out books to ``destination`` (``.txt`` or ``.txt.gz``), atomically.

    The output keeps the corpus format (a chapter per blank-line-separated block), so
    ``train-tokenizer`` and ``preprocess`` read it as they read the full corpus. gzip output is
    written without a timestamp or file name, so the same input gives the same bytes.

    Returns:
        ``{"path", "train_chapters", "heldout_chapters", "heldout_books"}``.
    """
    train, held = split_books(iter_documents(source), heldout_books)
    payload = "".join(doc + "\n\n" for doc in train).encode("utf-8")
    tmp = f"{destination}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        if destination.endswith(".gz"):
            with gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
                gz.write(payload)
        else:
            f.write(payload)
    os.replace(tmp, destination)
    return {"path": destination, "train_chapters": len(train), "heldout_chapters": len(held),
            "heldout_books": list(heldout_books)}


def word_string(text: str) -> str:
    """``text`` as lower-case words of letters, single-spaced: the form overlap is checked in."""
    return " ".join(re.findall(r"[a-z]+", text.lower()))


def padded_word_string(documents: Iterable[str]) -> str:
    """The documents as one :func:`word_string` with a space at each end, for :func:`occurs_in`."""
    return " " + " ".join(word_string(doc) for doc in documents) + " "


def occurs_in(phrase: str, padded_words: str) -> bool:
    """Whether ``phrase`` occurs, as whole words, in ``padded_words`` (from :func:`padded_word_string`)."""
    return f" {word_string(phrase)} " in padded_words


def word_ngrams(words: str, n: int) -> set[str]:
    """Every run of ``n`` consecutive words of a :func:`word_string` (empty when it has fewer words)."""
    tokens = words.split()
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}
