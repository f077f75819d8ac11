"""Sentencepiece training and the Tokenizer wrapper, on a slice of the shipped corpus."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from megatron_grow.__main__ import main
from megatron_grow.data.text import iter_documents, iter_lines
from megatron_grow.data.tokenizer import Tokenizer, train_tokenizer
from megatron_grow.errors import DataError

CORPUS = Path(__file__).resolve().parents[2] / "data" / "corpus" / "kjv.txt.gz"
VOCAB = 400


def corpus_slice(n_documents: int) -> list[str]:
    docs = []
    for doc in iter_documents(str(CORPUS)):
        docs.append(doc)
        if len(docs) == n_documents:
            break
    return docs


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "slice.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(corpus_slice(60)) + "\n")
    return path


@pytest.fixture(scope="module")
def bpe(text_file, tmp_path_factory) -> Tokenizer:
    prefix = tmp_path_factory.mktemp("bpe") / "bpe"
    summary = train_tokenizer([str(text_file)], str(prefix), VOCAB)
    assert Path(summary.model_file).is_file() and Path(summary.vocab_file).is_file()
    return Tokenizer(summary.model_file)


def test_corpus_is_the_kjv():
    docs = list(iter_documents(str(CORPUS)))
    assert len(docs) == 1189  # chapters
    assert docs[0].startswith("Genesis 1\n1 In the beginning God created the heaven and the earth.")
    assert docs[-1].split("\n")[0] == "Revelation 22"
    assert sum(doc.count("\n") for doc in docs) == 31102  # verses: one line each after the heading


def test_vocab_and_special_ids(bpe):
    assert bpe.vocab_size == VOCAB
    assert (bpe.unk, bpe.bos, bpe.eod, bpe.pad) == (0, 1, 2, 3)
    assert bpe.id_to_piece(4) == "\n"


def test_round_trip_keeps_newlines_and_spaces(bpe):
    text = "Genesis 1\n1 In the  beginning God created the heaven and the earth.\n\n2 And the earth"
    ids = bpe.encode(text)
    assert 4 in ids and 0 not in ids  # newline piece, no <unk>
    assert bpe.decode(ids) == text
    assert bpe.encode_batch([text, "light"]) == [ids, bpe.encode("light")]


def test_mcore_tokenizer_is_the_same_model(bpe):
    mcore = bpe.to_mcore()
    assert (mcore.vocab_size, mcore.eod, mcore.pad) == (VOCAB, bpe.eod, bpe.pad)
    text = "And God said, Let there be light"
    assert mcore.tokenize(text) == bpe.encode(text)
    assert mcore.detokenize(bpe.encode(text)) == text


def test_training_is_deterministic(text_file, bpe, tmp_path):
    again = Tokenizer(train_tokenizer([str(text_file)], str(tmp_path / "again"), VOCAB).model_file)
    assert [again.id_to_piece(i) for i in range(VOCAB)] == [bpe.id_to_piece(i) for i in range(VOCAB)]


def test_unigram_from_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(corpus_slice(20))))
    assert sum(1 for _ in iter_lines(str(path))) > 400
    tok = Tokenizer(train_tokenizer([str(path)], str(tmp_path / "uni"), 300, model_type="unigram").model_file)
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode("In the beginning")) == "In the beginning"


def test_bad_inputs(tmp_path, text_file):
    with pytest.raises(DataError, match="not found"):
        train_tokenizer([str(tmp_path / "nope.txt")], str(tmp_path / "t"), VOCAB)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(DataError, match="no text"):
        train_tokenizer([str(blank)], str(tmp_path / "t"), VOCAB)
    with pytest.raises(DataError, match="Vocabulary size too high"):
        train_tokenizer([str(text_file)], str(tmp_path / "t"), 100_000)
    with pytest.raises(DataError, match="leaves no room"):
        train_tokenizer([str(text_file)], str(tmp_path / "t"), 5)
    with pytest.raises(DataError, match="tokenizer model not found"):
        Tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(DataError, match="not a sentencepiece model"):
        Tokenizer(str(blank))


def test_cli(text_file, tmp_path, capsys):
    prefix = tmp_path / "cli"
    assert main(["train-tokenizer", "--input", str(text_file), "--vocab-size", str(VOCAB),
                 "--model-prefix", str(prefix)]) == 0
    assert "bpe, 400 pieces" in capsys.readouterr().out
    assert Tokenizer(str(prefix) + ".model").vocab_size == VOCAB
    assert main(["train-tokenizer", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "64",
                 "--model-prefix", str(prefix)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatron-grow: error: input file(s) not found") and "\n" not in err
