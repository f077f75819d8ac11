"""MCore GPTDataset/BlendedDataset splits from real indexed data, and exact resume with DP slicing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_grow.config.schema import DataConfig, ModelConfig, TrainingConfig
from megatron_grow.data.datasets import (
    PretrainingBatchSampler,
    build_datasets,
    make_batch_iterator,
    parse_data_path,
    split_sizes,
)
from megatron_grow.data.helpers import ensure_dataset_helpers
from megatron_grow.data.preprocess import preprocess
from megatron_grow.data.text import iter_documents
from megatron_grow.data.tokenizer import Tokenizer, train_tokenizer
from megatron_grow.errors import DataError

CORPUS = Path(__file__).resolve().parents[2] / "data" / "corpus" / "kjv.txt.gz"
VOCAB = 500
SEQ = 32
MODEL = ModelConfig(vocab_size=512, seq_length=SEQ)
TRAINING = TrainingConfig(train_iters=10, global_batch_size=8, eval_interval=5, eval_iters=1, seed=7)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A tokenizer and three datasets: A (chapters 0-59), B (chapters 60-99), tiny (3 chapters)."""
    root = tmp_path_factory.mktemp("data")
    docs = []
    for doc in iter_documents(str(CORPUS)):
        docs.append(doc)
        if len(docs) == 100:
            break
    files = {}
    for name, part in (("a", docs[:60]), ("b", docs[60:]), ("tiny", docs[:3])):
        files[name] = root / f"{name}.txt"
        files[name].write_text("\n\n".join(part) + "\n")
    tok = Tokenizer(train_tokenizer([str(files["a"])], str(root / "tok"), VOCAB).model_file)
    out = {"tok": tok, "root": root}
    for name, path in files.items():
        out[name] = str(root / name)
        preprocess([str(path)], tok.model_file, out[name], workers=1, append_eod=True)
    return out


def samples_equal(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)


@pytest.mark.slow
def test_blend_follows_weights(data):
    config = DataConfig(data_path=(0.25, data["a"], 0.75, data["b"]), split="90,5,5")
    train, valid, test = build_datasets(config, MODEL, TRAINING, data["tok"])
    assert [len(train), len(valid), len(test)] == split_sizes(TRAINING) == [80, 24, 8]
    ids = [int(train[i]["dataset_id"]) for i in range(len(train))]
    assert (ids.count(0), ids.count(1)) == (20, 60)
    assert train.datasets[0].dataset_path.endswith("/a") and train.datasets[1].dataset_path.endswith("/b")
    sample = train[0]
    assert sample["tokens"].shape == (SEQ,) and torch.equal(sample["labels"][:-1], sample["tokens"][1:])
    assert "attention_mask" not in sample


def test_splits_partition_documents(data):
    config = DataConfig(data_path=(data["a"],), split="80,10,10")
    train, valid, test = build_datasets(config, MODEL, TRAINING, data["tok"], create_attention_mask=True)
    assert [type(d).__name__ for d in (train, valid, test)] == ["GPTDataset"] * 3
    assert (list(train.indices), list(valid.indices), list(test.indices)) == \
        (list(range(48)), list(range(48, 54)), list(range(54, 60)))
    assert train[0]["attention_mask"].shape == (1, SEQ, SEQ)
    only_train = build_datasets(DataConfig(data_path=(data["a"],), split="100,0,0"), MODEL, TRAINING, data["tok"])
    assert only_train.valid is None and only_train.test is None and len(only_train.train) >= 80


def test_same_samples_from_a_fresh_cache(data, tmp_path):
    config = DataConfig(data_path=(1, data["a"], 3, data["b"]), split="90,5,5")
    first = build_datasets(config, MODEL, TRAINING, data["tok"]).train
    again = build_datasets(config, MODEL, TRAINING, data["tok"], cache_dir=str(tmp_path / "fresh")).train
    assert any((tmp_path / "fresh").iterdir()) and any((data["root"] / "index_cache").iterdir())
    assert all(samples_equal(first[i], again[i]) for i in range(0, 80, 7))


def test_resume_is_exact_and_dp_ranks_partition_each_step(data):
    config = DataConfig(data_path=(0.5, data["a"], 0.5, data["b"]), split="90,5,5")
    train = build_datasets(config, MODEL, TRAINING, data["tok"]).train
    mbs, dp, n = 2, 2, 4
    step = mbs * dp
    for rank in range(dp):
        straight = list(make_batch_iterator(train, 0, mbs, rank, dp))[: 2 * n]
        first = make_batch_iterator(train, 0, mbs, rank, dp)
        resumed = [next(first) for _ in range(n)] + list(make_batch_iterator(train, n * step, mbs, rank, dp))[:n]
        assert len(straight) == len(resumed) == 2 * n
        assert all(samples_equal(x, y) for x, y in zip(straight, resumed))
        assert set(straight[0]) == {"tokens", "labels", "loss_mask", "position_ids"}
    # Each global micro-batch step is split over the ranks: every sample exactly once, in order.
    per_rank = [list(make_batch_iterator(train, 8, mbs, rank, dp)) for rank in range(dp)]
    assert len(per_rank[0]) == len(per_rank[1]) == (80 - 8) // step
    for k in range(len(per_rank[0])):
        tokens = torch.cat([per_rank[rank][k]["tokens"] for rank in range(dp)])
        expected = torch.stack([train[8 + k * step + j]["tokens"] for j in range(step)])
        assert torch.equal(tokens, expected)
    indices = [list(PretrainingBatchSampler(80, 16, mbs, rank, dp)) for rank in range(dp)]
    flat = [i for k in range(len(indices[0])) for rank in range(dp) for i in indices[rank][k]]
    assert flat == list(range(16, 80))
    # Worker processes give the same batches.
    with_worker = make_batch_iterator(train, 12, mbs, 1, dp, num_workers=1)
    assert all(samples_equal(next(with_worker), per_rank[1][1 + i]) for i in range(3))


def test_data_path_forms():
    assert parse_data_path(["x"]) == (["x"], None)
    assert parse_data_path(["x", "y"]) == (["x", "y"], None)
    assert parse_data_path([0.3, "x", "0.7", "y"]) == (["x", "y"], [0.3, 0.7])
    assert parse_data_path("1 x 3 y") == (["x", "y"], [1.0, 3.0])
    for bad in ([0.5, "x", "y"], ["x", 0.5], [0, "x", 1, "y"], []):
        with pytest.raises(DataError, match="data.data_path"):
            parse_data_path(bad)


def test_bad_inputs(data, tmp_path):
    tok = data["tok"]
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError, match=r"missing .*nope\.bin and .*nope\.idx .*megatron-grow preprocess"):
        build_datasets(DataConfig(data_path=(1, data["a"], 1, missing)), MODEL, TRAINING, tok)
    with pytest.raises(DataError, match="without .bin/.idx"):
        build_datasets(DataConfig(data_path=(data["a"] + ".bin",)), MODEL, TRAINING, tok)
    with pytest.raises(DataError, match=r"model.vocab_size \(256\) is smaller than the tokenizer's vocabulary \(500"):
        build_datasets(DataConfig(data_path=(data["a"],)), ModelConfig(vocab_size=256, seq_length=SEQ), TRAINING, tok)
    with pytest.raises(DataError, match="has 3 document.*valid split 0 of them"):
        build_datasets(DataConfig(data_path=(data["tiny"],), split="98,1,1"), MODEL, TRAINING, tok)
    with pytest.raises(DataError, match="data.split"):
        build_datasets(DataConfig(data_path=(data["a"],), split="lots,some"), MODEL, TRAINING, tok)
    with pytest.raises(DataError, match="train_iters is 0"):
        build_datasets(DataConfig(data_path=(data["a"],), split="90,5,5"), MODEL, TrainingConfig(train_iters=0), tok)
    with pytest.raises(DataError, match=r"consumed samples \(81\) exceed the dataset \(80 samples\)"):
        PretrainingBatchSampler(80, 81, 2, 0, 2)
    with pytest.raises(DataError, match="rank 2 is outside"):
        PretrainingBatchSampler(80, 0, 2, 2, 2)
    with pytest.raises(DataError, match="no dataset"):
        make_batch_iterator(None, 0, 1, 0, 1)


def test_dataset_helpers_are_importable():
    helpers = ensure_dataset_helpers()
    assert hasattr(helpers, "build_sample_idx_int32") and hasattr(helpers, "build_blending_indices")


def validation_ids(valid, n: int) -> torch.Tensor:
    """The token ids of validation samples 0..n-1 (each sample's tokens plus its last label)."""
    return torch.stack([torch.cat([torch.as_tensor(valid[i]["tokens"]), torch.as_tensor(valid[i]["labels"])[-1:]])
                        for i in range(n)])


def test_eval_samples_fix_the_validation_tokens_whatever_train_iters(data):
    # What one evaluation reads: samples 0 .. eval_iters * global_batch_size - 1.
    n = TRAINING.eval_iters * TRAINING.global_batch_size
    short, long = dataclasses.replace(TRAINING, train_iters=10), dataclasses.replace(TRAINING, train_iters=400)
    fixed = DataConfig(data_path=(data["a"],), split="80,10,10", eval_samples=n)
    a = build_datasets(fixed, MODEL, short, data["tok"]).valid
    b = build_datasets(fixed, MODEL, long, data["tok"]).valid
    assert len(a) == len(b) >= n  # MCore builds whole epochs: at least the samples asked for
    assert torch.equal(validation_ids(a, n), validation_ids(b, n))
    # Megatron-LM's count grows with train_iters, MCore's shuffled index spans more epochs, and the
    # first validation samples change: what runs of different lengths were compared on before.
    free = DataConfig(data_path=(data["a"],), split="80,10,10")
    c = build_datasets(free, MODEL, short, data["tok"]).valid
    d = build_datasets(free, MODEL, long, data["tok"]).valid
    assert (split_sizes(short)[1], split_sizes(long)[1]) == (24, 648) and len(d) > len(c) >= 24
    assert not torch.equal(validation_ids(c, n), validation_ids(d, n))


def test_eval_seed_fixes_the_validation_tokens_whatever_the_training_seed(data):
    n = TRAINING.eval_iters * TRAINING.global_batch_size
    seeds = [dataclasses.replace(TRAINING, seed=s) for s in (7, 8, 9)]
    fixed = DataConfig(data_path=(data["a"],), split="80,10,10", eval_samples=n, eval_seed=5)
    splits = [build_datasets(fixed, MODEL, t, data["tok"]) for t in seeds]
    for other in splits[1:]:
        assert torch.equal(validation_ids(splits[0].valid, n), validation_ids(other.valid, n))
        assert torch.equal(validation_ids(splits[0].test, n), validation_ids(other.test, n))
        # The training order still follows each run's own seed.
        assert not torch.equal(validation_ids(splits[0].train, 2 * n), validation_ids(other.train, 2 * n))
    # eval_seed equal to the training seed is the plain build; without it, the validation order
    # follows the training seed (Megatron-LM's behaviour).
    plain = DataConfig(data_path=(data["a"],), split="80,10,10", eval_samples=n)
    same = build_datasets(plain, MODEL, dataclasses.replace(TRAINING, seed=5), data["tok"])
    assert torch.equal(validation_ids(same.valid, n), validation_ids(splits[0].valid, n))
    other = build_datasets(plain, MODEL, seeds[1], data["tok"])
    assert not torch.equal(validation_ids(other.valid, n), validation_ids(splits[0].valid, n))


def test_empty_or_damaged_dataset_is_named_before_training(data, tmp_path):
    """Empty .bin/.idx files, a valid index of zero documents, and a garbage index: one DataError
    each (MCore itself fails with AttributeError: 'IndexedDataset' object has no attribute 'bin_reader')."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_grow.data.datasets import check_prefixes

    empty = str(tmp_path / "empty")
    open(empty + ".bin", "wb").close()
    open(empty + ".idx", "wb").close()
    with pytest.raises(DataError, match=r"empty\.bin and .*empty\.idx are empty"):
        check_prefixes([empty])

    no_docs = str(tmp_path / "no_docs")  # written by MCore's own builder, finalized with nothing added
    IndexedDatasetBuilder(no_docs + ".bin").finalize(no_docs + ".idx")
    with pytest.raises(DataError, match="no_docs") as e:
        check_prefixes([no_docs])
    assert "empty" in str(e.value) or "no tokens" in str(e.value)

    garbage = str(tmp_path / "garbage")
    with open(garbage + ".bin", "wb") as f:
        f.write(b"\x00" * 64)
    with open(garbage + ".idx", "wb") as f:
        f.write(b"this is not an MCore index" * 4)
    with pytest.raises(DataError, match=r"garbage\.idx is unreadable"):
        check_prefixes([garbage])
    check_prefixes([data["a"]])  # a real dataset passes
