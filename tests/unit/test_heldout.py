"""The held-out books and ``kjv_heldout_cloze``: no question is training text, and the task file is reproducible.

The corpus is re-read here with plain ``gzip`` and split on blank lines, and text is compared in
a normal form written here (lower-case letter words), so the checks do not lean on the code
under test.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import re
from pathlib import Path

import pytest

from megatron_grow.data.heldout import HELDOUT_BOOKS, book_of, split_books, write_training_text
from megatron_grow.errors import DataError
from megatron_grow.interop.evaluate import shipped_tasks

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "corpus" / "kjv.txt.gz"
TASK_DIR = REPO / "data" / "eval" / "kjv_heldout_cloze"


def _normal(text: str) -> str:
    return " " + " ".join(re.sub(r"[^a-z]+", " ", text.lower()).split()) + " "


def _chapters(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [c for c in f.read().split("\n\n") if c.strip()]


def _book(chapter: str) -> str:
    return re.sub(r" \d+$", "", chapter.split("\n", 1)[0])


def _items(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def training_text(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heldout") / "train.txt.gz"
    write_training_text(str(CORPUS), str(out))
    return out


@pytest.fixture(scope="module")
def training_words(training_text) -> str:
    return _normal(" ".join(_chapters(training_text)))


def _seen(items: list[dict], training_words: str) -> list[str]:
    """Every distinct question text (a verse's first half, a choice) found in the training words."""
    texts = set()
    for item in items:
        texts.add(item["context"].split("\n", 1)[1].split(" ", 1)[1])
        texts.update(item["choices"])
    return sorted(t for t in texts if _normal(t) in training_words)


def test_no_heldout_question_text_in_training_text(training_words):
    assert _seen(_items(TASK_DIR / "kjv_heldout_cloze.jsonl"), training_words) == []


def test_the_check_finds_training_text_in_the_old_task(training_words):
    # kjv_cloze is drawn from the whole corpus: the same check must flag most of its items.
    old = _items(REPO / "data" / "eval" / "kjv_cloze" / "kjv_cloze.jsonl")[:40]
    assert len(_seen(old, training_words)) > len(old)


def test_every_question_is_a_verse_of_a_heldout_book():
    verses = {}
    for chapter in _chapters(CORPUS):
        heading, *lines = chapter.split("\n")
        for line in lines:
            verses[(heading, line.split(" ", 1)[0])] = line.split(" ", 1)[1]
    held_words = _normal(" ".join(v for (h, _), v in verses.items() if _book(h) in HELDOUT_BOOKS))
    for item in _items(TASK_DIR / "kjv_heldout_cloze.jsonl"):
        heading, verse = item["context"].split("\n")
        number, head = verse.split(" ", 1)
        assert _book(heading) in HELDOUT_BOOKS
        assert verses[(heading, number)].split() == (head + " " + item["choices"][item["label"]]).split()
        assert len(set(item["choices"])) == 4 and all(_normal(c) in held_words for c in item["choices"])


def test_enough_questions_for_a_standard_error_of_0_02():
    items = _items(TASK_DIR / "kjv_heldout_cloze.jsonl")
    # The binomial standard error sqrt(p (1 - p) / n) is largest at p = 1/2.
    assert len(items) >= 700 and math.sqrt(0.5 * 0.5 / len(items)) <= 0.02
    assert [i["id"] for i in items] == list(range(len(items)))
    assert "kjv_heldout_cloze" in shipped_tasks()


@pytest.mark.slow  # ~4 s of CPU (every 8-word run of the training text), more on a loaded machine
def test_shipped_task_file_is_the_generators_output():
    spec = importlib.util.spec_from_file_location("make_heldout", TASK_DIR / "make_kjv_heldout_cloze.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.jsonl_lines() == (TASK_DIR / "kjv_heldout_cloze.jsonl").read_text(encoding="utf-8").splitlines(
        keepends=True)


def test_training_text_is_the_corpus_without_the_heldout_books(training_text, tmp_path):
    corpus = _chapters(CORPUS)
    # As ``preprocess`` reads documents: trailing spaces cut (one verse, Mark 10:19, has one).
    corpus = ["\n".join(line.rstrip() for line in c.split("\n")) for c in corpus]
    assert _chapters(training_text) == [c for c in corpus if _book(c) not in HELDOUT_BOOKS]
    assert {_book(c) for c in corpus} >= set(HELDOUT_BOOKS)
    again = tmp_path / "again.txt.gz"
    summary = write_training_text(str(CORPUS), str(again))
    assert again.read_bytes() == training_text.read_bytes()  # gzip without a timestamp: same bytes
    assert summary["heldout_chapters"] == sum(_book(c) in HELDOUT_BOOKS for c in corpus)
    assert os.listdir(tmp_path) == ["again.txt.gz"]  # no temporary file left behind
    plain = tmp_path / "plain.txt"
    write_training_text(str(CORPUS), str(plain), ["Ruth"])
    assert plain.read_text(encoding="utf-8").split("\n\n")[:-1] == [c for c in corpus if _book(c) != "Ruth"]


def test_book_names_and_bad_input():
    assert book_of("Song of Solomon 2\n1 I am the rose of Sharon") == "Song of Solomon"
    assert book_of("1 Samuel 3\n1 And the child Samuel") == "1 Samuel"
    with pytest.raises(DataError, match="'Genesis'"):
        book_of("Genesis\n1 In the beginning")
    with pytest.raises(DataError, match="Rut not found"):
        split_books(["Ruth 1\n1 Now it came to pass"], ["Rut"])


@pytest.mark.slow
def test_lm_eval_loads_the_task(tmp_path, monkeypatch):
    # Lazy: lm-eval takes seconds to import, which every collection of this file would otherwise pay.
    import lm_eval.tasks as lm_eval_tasks

    from megatron_grow.interop.evaluate import _local_task_dir

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = lm_eval_tasks.TaskManager(include_path=_local_task_dir(str(tmp_path)))
    task = lm_eval_tasks.get_task_dict(["kjv_heldout_cloze"], manager)["kjv_heldout_cloze"]
    docs = list(task.test_docs())
    first = _items(TASK_DIR / "kjv_heldout_cloze.jsonl")[0]
    assert len(docs) == 800
    assert (task.doc_to_text(docs[0]), task.doc_to_choice(docs[0]), task.doc_to_target(docs[0])) == (
        first["context"], first["choices"], first["label"])
