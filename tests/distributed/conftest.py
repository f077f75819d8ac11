"""Shared fixtures: a small real corpus, tokenized, as MCore indexed datasets."""

from __future__ import annotations

import gzip
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(REPO, "data", "corpus", "kjv.txt.gz")


@pytest.fixture(scope="session")
def kjv_dataset(tmp_path_factory):
    """A 512-token sentencepiece model and the first ~300 KB of the corpus as a dataset prefix."""
    from megatron_grow.data.preprocess import preprocess
    from megatron_grow.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("kjv")
    text = root / "kjv_part.txt"
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        text.write_text(f.read(300_000), encoding="utf-8")
    train_tokenizer([str(text)], str(root / "tok"), 512)
    preprocess([str(text)], str(root / "tok.model"), str(root / "kjv"), workers=1)
    return {"tokenizer": str(root / "tok.model"), "prefix": str(root / "kjv"), "dir": str(root)}


def write_recipe(path, dataset, run_dir, **sections) -> str:
    """A tiny-model training recipe over ``dataset``; ``sections`` override keys per section."""
    import yaml

    recipe = {
        "include": os.path.join(REPO, "configs", "models", "tiny.yaml"),
        "model": {"vocab_size": 512, "seq_length": 32},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 6, "lr": 3.0e-3,
                     "min_lr": 3.0e-4, "lr_decay_style": "constant", "eval_interval": 100, "eval_iters": 2},
        "data": {"data_path": [dataset["prefix"]], "tokenizer_model": dataset["tokenizer"], "split": "95,5,0"},
        "checkpoint": {"save": str(run_dir), "load": str(run_dir), "save_interval": 3, "keep_last": 5},
        "logging": {"log_interval": 1},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return str(path)
