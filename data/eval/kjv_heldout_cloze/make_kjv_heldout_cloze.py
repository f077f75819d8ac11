"""Build kjv_heldout_cloze.jsonl: verse completions from books of the King James Bible that no run trains on.

The books are ``megatron_grow.data.heldout.HELDOUT_BOOKS`` (Ruth, Esther, Ecclesiastes, Daniel,
Romans, James); a study that scores this task trains on ``write_training_text``'s output, the
shipped corpus without them. Each item is one held-out verse of 12-40 words cut after half its
words: the context is the chapter heading and that first half; the four choices are the verse's
true second half and the second halves of three other held-out verses of similar length (within
3 words), so no choice is text the model was trained on. A verse is used only if neither half
occurs in the training text and no run of 8 of its words does (compared as lower-case letter
words, so a passage quoted in a training book with other punctuation still counts as seen), and
only if its second half is unlike every other candidate's. Deterministic (fixed seed; no timestamps):

    python data/eval/kjv_heldout_cloze/make_kjv_heldout_cloze.py   # rewrites kjv_heldout_cloze.jsonl
"""

from __future__ import annotations

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, REPO)  # run as a plain script from a checkout: the split is the library's, not a copy

from megatron_grow.data.heldout import (  # noqa: E402
    occurs_in,
    padded_word_string,
    split_books,
    word_ngrams,
    word_string,
)
from megatron_grow.data.text import iter_documents  # noqa: E402

CORPUS = os.path.join(REPO, "data", "corpus", "kjv.txt.gz")
# 800 items: the binomial standard error of one accuracy is at most sqrt(0.25 / 800) = 0.0177.
NUM_ITEMS, NUM_CHOICES, SEED = 800, 4, 20261207
MIN_WORDS, MAX_WORDS, LENGTH_SLACK = 12, 40, 3
SEEN_RUN = 8  # a verse sharing this many consecutive words with the training text is not used


def candidate_verses(held: list[str], train_words: str) -> list[dict]:
    """Held-out verses of MIN..MAX words, cut in half, unseen in the training text, second halves distinct."""
    train_runs = word_ngrams(train_words, SEEN_RUN)
    out, seen_tails = [], set()
    for doc in held:
        heading, *lines = doc.split("\n")
        for line in lines:
            number, _, text = line.partition(" ")
            words = text.split()
            if not MIN_WORDS <= len(words) <= MAX_WORDS:
                continue
            cut = len(words) // 2
            head, tail = " ".join(words[:cut]), " ".join(words[cut:])
            if occurs_in(head, train_words) or occurs_in(tail, train_words) or word_string(tail) in seen_tails:
                continue
            if word_ngrams(word_string(text), SEEN_RUN) & train_runs:
                continue
            seen_tails.add(word_string(tail))
            out.append({"heading": heading, "number": number, "head": head, "tail": tail})
    return out


def build_items(pool: list[dict], rng: random.Random) -> list[dict]:
    if len(pool) < NUM_ITEMS:
        raise SystemExit(f"only {len(pool)} usable held-out verses, {NUM_ITEMS} wanted")
    items = []
    for i, idx in enumerate(rng.sample(range(len(pool)), NUM_ITEMS)):
        v = pool[idx]
        n = len(v["tail"].split())
        similar = [j for j in rng.sample(range(len(pool)), len(pool))
                   if j != idx and abs(len(pool[j]["tail"].split()) - n) <= LENGTH_SLACK]
        choices = [v["tail"]] + [pool[j]["tail"] for j in similar[:NUM_CHOICES - 1]]
        rng.shuffle(choices)
        items.append({"id": i, "context": f"{v['heading']}\n{v['number']} {v['head']}",
                      "choices": choices, "label": choices.index(v["tail"])})
    return items


def jsonl_lines() -> list[str]:
    """The task file's lines, built from the shipped corpus."""
    train, held = split_books(iter_documents(CORPUS))
    pool = candidate_verses(held, padded_word_string(train))
    return [json.dumps(item) + "\n" for item in build_items(pool, random.Random(SEED))]


def main() -> None:
    lines = jsonl_lines()
    with open(os.path.join(HERE, "kjv_heldout_cloze.jsonl"), "w", encoding="utf-8") as out:
        out.writelines(lines)
    print(f"{len(lines)} items -> {os.path.join(HERE, 'kjv_heldout_cloze.jsonl')}")


if __name__ == "__main__":
    main()
