"""Downstream accuracy with lm-evaluation-harness on one of our checkpoints.

The checkpoint is exported on the fly (``interop.hf.exporter``) into a temporary directory and
evaluated by lm-eval's Hugging Face backend (``transformers``), so the numbers are exactly
what anyone loading the exported model would measure. Tasks: any lm-eval task name (whose
dataset must be reachable or cached), plus the tasks shipped under ``data/eval/`` (local
files, no network), e.g. ``kjv_cloze``.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

from megatron_grow.errors import InteropError
from megatron_grow.interop.hf.exporter import export_hf
from megatron_grow.interop.hf.tokenizer import sentencepiece_to_hf_dir

SHIPPED_TASKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                 "data", "eval")


@dataclass(frozen=True)
class TaskScore:
    """One metric of one lm-eval task: its value, its standard error and the samples scored."""

    task: str
    metric: str
    value: float
    stderr: float | None
    samples: int
    per_question: tuple[float, ...] | None = None  # the metric of each question in lm-eval's doc order, if asked for


def shipped_tasks() -> list[str]:
    """The lm-eval tasks shipped in ``data/eval`` (each a folder with ``<task>.yaml``).

    Returns:
        Their names, sorted (empty when the folder is absent).
    """
    if not os.path.isdir(SHIPPED_TASKS_DIR):
        return []
    return sorted(d for d in os.listdir(SHIPPED_TASKS_DIR) if os.path.isfile(
        os.path.join(SHIPPED_TASKS_DIR, d, f"{d}.yaml")))


def _local_task_dir(tmp: str) -> str:
    """The shipped task YAMLs with their data paths made absolute (they are relative to the repo root)."""
    out = os.path.join(tmp, "tasks")
    os.makedirs(out)
    repo = os.path.dirname(SHIPPED_TASKS_DIR.rstrip(os.sep))
    repo = os.path.dirname(repo)
    for name in shipped_tasks():
        with open(os.path.join(SHIPPED_TASKS_DIR, name, f"{name}.yaml"), encoding="utf-8") as f:
            text = f.read()
        text = re.sub(r"(?m)^(\s+\w+:\s*)(data/eval/\S+)$", lambda m: m.group(1) + os.path.join(repo, m.group(2)),
                      text)
        with open(os.path.join(out, f"{name}.yaml"), "w", encoding="utf-8") as f:
            f.write(text)
    return out


def _tokenizer_dir(tokenizer: str | None, tmp: str) -> str | None:
    if tokenizer and os.path.isfile(tokenizer):  # a sentencepiece .model from train-tokenizer
        return sentencepiece_to_hf_dir(tokenizer, os.path.join(tmp, "tokenizer"))
    return tokenizer


def scores_from_results(results: dict, tasks: list[str]) -> list[TaskScore]:
    """The scores of lm-eval's ``simple_evaluate`` results.

    Args:
        results: lm-eval's result dict.
        tasks: the tasks asked for.

    Returns:
        One :class:`TaskScore` per task and metric (stderr entries folded into their metric).
    """
    out = []
    for task, metrics in results["results"].items():
        n = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
        # Present when lm-eval ran with log_samples: one record per question with each metric's value.
        samples = sorted((results.get("samples") or {}).get(task, []), key=lambda record: record["doc_id"])
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if name.endswith("_stderr") or not isinstance(value, (int, float)) or name in ("alias", "sample_len"):
                continue
            stderr = metrics.get(f"{name}_stderr,{_filter}")
            per_question = tuple(float(r[name]) for r in samples if r.get("filter") == _filter and name in r)
            out.append(TaskScore(task, name, float(value), float(stderr) if isinstance(stderr, (int, float)) else None,
                                 n, per_question or None))
    return out


def evaluate_checkpoint(load: str, tasks: list[str], *, tokenizer: str | None = None, limit: int | None = None,
                        num_fewshot: int = 0, batch_size: int = 8, device: str = "cpu",
                        architecture: str | None = None, progress: bool = True,
                        per_question: bool = False) -> list[TaskScore]:
    """Export ``load`` to a temporary HF directory and run lm-eval's HF backend on ``tasks``.

    Args:
        load: a run root or an ``iter_NNNNNNN`` directory.
        tasks: lm-eval task names (shipped or installed).
        tokenizer: the SentencePiece model or HF tokenizer directory to evaluate with.
        limit: score at most this many samples per task.
        num_fewshot: few-shot examples per prompt.
        batch_size: lm-eval's batch size.
        device: the torch device to evaluate on.
        architecture: the HF class to export as.
        progress: show progress.
        per_question: also return each question's outcome (``TaskScore.per_question``, in document
            order), for question-sampling errors of paired differences between models.

    Returns:
        The scores (:func:`scores_from_results`).
    """
    # No hub look-ups (each would wait for a network timeout on offline machines): local task files and
    # cached datasets load; set HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 to let lm-eval download datasets.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="mg_eval_") as tmp:
        # Lazy: lm-eval is optional (the hf extra), and it and `datasets` read the offline settings above at import.
        import lm_eval
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=_local_task_dir(tmp))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise InteropError(f"unknown lm-eval task(s) {unknown}; shipped: {shipped_tasks()}")
        hf_dir = os.path.join(tmp, "hf")
        summary = export_hf(load, hf_dir, architecture=architecture, tokenizer=_tokenizer_dir(tokenizer, tmp),
                            dtype="fp32", progress=progress)
        if not any(f.startswith("tokenizer") for f in summary["tokenizer_files"]):
            raise InteropError(f"no tokenizer for {load}: pass --tokenizer (an HF tokenizer directory or a "
                               "sentencepiece .model); none is recorded from an HF import")
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": hf_dir, "dtype": "float32", "device": device},
            tasks=list(tasks), num_fewshot=num_fewshot, batch_size=batch_size, limit=limit,
            task_manager=manager, log_samples=per_question, bootstrap_iters=1000)
    return scores_from_results(results, tasks)
