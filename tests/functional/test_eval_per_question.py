"""Per-question outcomes from a real lm-eval run: a tiny Qwen3-MoE (transformers) with a sentencepiece
tokenizer trained on the shipped corpus, scored on the shipped ``kjv_heldout_cloze`` by lm-eval's HF
backend with ``log_samples``; ``scores_from_results`` must return one 0/1 outcome per question whose
mean is lm-eval's own accuracy."""

from __future__ import annotations

import gzip
import os

import pytest

from megatron_grow.data.tokenizer import train_tokenizer
from megatron_grow.interop.evaluate import _local_task_dir, scores_from_results
from megatron_grow.interop.hf.tiny import save_tiny_model
from megatron_grow.interop.hf.tokenizer import sentencepiece_to_hf_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_per_question_outcomes_match_the_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Lazy: lm-eval and `datasets` read the offline settings above when first imported.
    import lm_eval
    from lm_eval.tasks import TaskManager

    text = tmp_path / "kjv.txt"
    with gzip.open(os.path.join(REPO, "data", "corpus", "kjv.txt.gz"), "rt", encoding="utf-8") as f:
        text.write_text(f.read(200_000), encoding="utf-8")
    train_tokenizer([str(text)], str(tmp_path / "tok"), 512)
    hf_dir = save_tiny_model("Qwen3MoeForCausalLM", str(tmp_path / "hf"), vocab_size=512)
    sentencepiece_to_hf_dir(str(tmp_path / "tok.model"), hf_dir)
    n = 12
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": hf_dir, "dtype": "float32", "device": "cpu"},
        tasks=["kjv_heldout_cloze"], limit=n, batch_size=8, log_samples=True,
        task_manager=TaskManager(include_path=_local_task_dir(str(tmp_path))))
    scores = {s.metric: s for s in scores_from_results(results, ["kjv_heldout_cloze"])}
    assert set(scores) == {"acc", "acc_norm"}
    for score in scores.values():
        assert len(score.per_question) == n and set(score.per_question) <= {0.0, 1.0}
        assert sum(score.per_question) / n == pytest.approx(score.value, abs=1e-12)
    without = scores_from_results({k: v for k, v in results.items() if k != "samples"}, ["kjv_heldout_cloze"])
    assert all(s.per_question is None for s in without)
