"""Build kjv_cloze.jsonl: verse-completion questions from the shipped King James Bible.

Each item is one verse of 12-40 words cut after about half its words: the context is the
chapter heading and that first half; the four choices are the verse's true second half and
the second halves of three other verses of similar length (drawn at random). Deterministic:

    python data/eval/kjv_cloze/make_kjv_cloze.py          # rewrites kjv_cloze.jsonl
"""

from __future__ import annotations

import gzip
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "corpus", "kjv.txt.gz")
NUM_ITEMS, NUM_CHOICES, SEED = 200, 4, 20261129


def verses():
    heading = None
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                heading = None
            elif heading is None:
                heading = line
            else:
                number, _, text = line.partition(" ")
                words = text.split()
                if 12 <= len(words) <= 40:
                    cut = len(words) // 2
                    yield {"heading": heading, "number": number, "head": " ".join(words[:cut]),
                           "tail": " ".join(words[cut:])}


def main() -> None:
    rng = random.Random(SEED)
    pool = list(verses())
    picked = rng.sample(range(len(pool)), NUM_ITEMS)
    with open(os.path.join(HERE, "kjv_cloze.jsonl"), "w", encoding="utf-8") as out:
        for i, idx in enumerate(picked):
            v = pool[idx]
            n = len(v["tail"].split())
            similar = [j for j in rng.sample(range(len(pool)), 400)
                       if j != idx and abs(len(pool[j]["tail"].split()) - n) <= 3 and pool[j]["tail"] != v["tail"]]
            choices = [v["tail"]] + [pool[j]["tail"] for j in similar[:NUM_CHOICES - 1]]
            rng.shuffle(choices)
            out.write(json.dumps({"id": i, "context": f"{v['heading']}\n{v['number']} {v['head']}",
                                  "choices": choices, "label": choices.index(v["tail"])}) + "\n")


if __name__ == "__main__":
    main()
