"""``preprocess``: text/JSONL -> MCore .bin/.idx with 2 workers, read back with MCore's IndexedDataset."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_grow.__main__ import main
from megatron_grow.data.preprocess import choose_dtype, preprocess
from megatron_grow.data.text import iter_documents
from megatron_grow.data.tokenizer import Tokenizer, train_tokenizer
from megatron_grow.errors import DataError

CORPUS = Path(__file__).resolve().parents[2] / "data" / "corpus" / "kjv.txt.gz"
N_DOCS = 40


@pytest.fixture(scope="module")
def docs() -> list[str]:
    out = []
    for doc in iter_documents(str(CORPUS)):
        out.append(doc)
        if len(out) == N_DOCS:
            return out
    raise AssertionError("corpus too short")


@pytest.fixture(scope="module")
def text_file(docs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pre") / "slice.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        # Extra blank lines and trailing spaces between documents must not change the documents.
        f.write("\n\n\n".join(d.replace("\n", "   \n", 1) for d in docs) + "\n\n")
    return path


@pytest.fixture(scope="module")
def tok(text_file, tmp_path_factory) -> Tokenizer:
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    return Tokenizer(train_tokenizer([str(text_file)], str(prefix), 500).model_file)


def test_two_workers_round_trip(docs, text_file, tok, tmp_path):
    prefix = str(tmp_path / "out")
    summary = preprocess([str(text_file)], tok.model_file, prefix, workers=2, append_eod=True, chunk_size=3)
    assert (summary.documents, summary.skipped_documents, summary.dtype) == (N_DOCS, 0, "uint16")
    ds = IndexedDataset(prefix)
    assert len(ds) == N_DOCS and ds.index.dtype == np.uint16
    assert list(ds.document_indices) == list(range(N_DOCS + 1))  # one sequence per document
    assert int(ds.sequence_lengths.sum()) == summary.tokens
    for i, doc in enumerate(docs):
        ids = ds[i].tolist()
        assert ids == tok.encode(doc) + [tok.eod]
        assert tok.decode(ids[:-1]) == doc
    assert summary.tokens_per_second > 0 and "40 documents" in summary.format()


def test_output_does_not_depend_on_workers(text_file, tok, tmp_path):
    a, b = str(tmp_path / "w1"), str(tmp_path / "w2")
    preprocess([str(text_file)], tok.model_file, a, workers=1)
    preprocess([str(text_file)], tok.model_file, b, workers=2, chunk_size=7)
    for ext in (".bin", ".idx"):
        assert Path(a + ext).read_bytes() == Path(b + ext).read_bytes()


def test_jsonl_inputs_in_order_and_empty_records(docs, tok, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    first.write_text(json.dumps({"body": docs[0]}) + "\n\n" + json.dumps({"body": ""}) + "\n")
    with gzip.open(second, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": docs[1], "meta": 1}) + "\n")
    prefix = str(tmp_path / "j")
    summary = preprocess([str(first), str(second)], tok.model_file, prefix, workers=2, json_key="body")
    assert (summary.documents, summary.skipped_documents) == (2, 1)
    ds = IndexedDataset(prefix)
    assert [tok.decode(ds[i]) for i in range(2)] == docs[:2]


@pytest.mark.slow
def test_bad_inputs_leave_no_files(tok, tmp_path, text_file):
    prefix = tmp_path / "bad"
    with pytest.raises(DataError, match="not found"):
        preprocess([str(tmp_path / "missing.txt")], tok.model_file, str(prefix))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    with pytest.raises(DataError, match="no documents"):
        preprocess([str(blank)], tok.model_file, str(prefix), workers=2)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        preprocess([str(broken)], tok.model_file, str(prefix), workers=2)
    with pytest.raises(DataError, match="has no key 'content'"):
        preprocess([str(broken)], tok.model_file, str(prefix), json_key="content")
    with pytest.raises(DataError, match="tokenizer model not found"):
        preprocess([str(text_file)], str(tmp_path / "none.model"), str(prefix))
    assert not list(tmp_path.glob("bad*"))


def test_dtype_must_hold_the_vocabulary():
    assert choose_dtype(500) == np.uint16 and choose_dtype(65536, "uint16") == np.uint16
    assert choose_dtype(70_000) == np.int32 and choose_dtype(500, "int32") == np.int32
    with pytest.raises(DataError, match=r"70,000 ids; uint16 holds at most 65,536"):
        choose_dtype(70_000, "uint16")


def test_cli(text_file, tok, tmp_path, capsys):
    prefix = str(tmp_path / "cli")
    assert main(["preprocess", "--input", str(text_file), "--tokenizer-model", tok.model_file,
                 "--output-prefix", prefix, "--workers", "2", "--append-eod", "--dtype", "int32"]) == 0
    out = capsys.readouterr().out
    assert "40 documents" in out and "tokens/s" in out
    assert IndexedDataset(prefix).index.dtype == np.int32
    assert main(["preprocess", "--input", str(tmp_path / "nope.txt"), "--tokenizer-model", tok.model_file,
                 "--output-prefix", prefix]) == 2
    assert capsys.readouterr().err.startswith("megatron-grow: error: input file(s) not found")
