"""Write a tiny random Hugging Face MoE (safetensors + config.json + tokenizer) for trying the
import -> grow -> train -> export -> eval path without a network.

    python scripts/hf/make_tiny_hf.py --out work/hf_tiny [--architecture Qwen3MoeForCausalLM]

The model is built with transformers from its config class (2 layers, hidden 64, 8 experts,
top-2; see megatron_grow/interop/hf/tiny.py) and saved with save_pretrained (sharded). The
tokenizer is a 512-piece sentencepiece model trained on the shipped King James Bible
(data/corpus/kjv.txt.gz) with megatron-grow's train-tokenizer, written as tokenizer.model +
tokenizer_config.json, so `megatron-grow preprocess --tokenizer-model OUT/tokenizer.model`
tokenizes training data with the same ids transformers uses.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from megatron_grow.data.tokenizer import train_tokenizer  # noqa: E402
from megatron_grow.interop.hf.tiny import ARCHITECTURES, save_tiny_model  # noqa: E402
from megatron_grow.interop.hf.tokenizer import sentencepiece_to_hf_dir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="Qwen3MoeForCausalLM")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if os.path.isdir(args.out) and os.listdir(args.out):
        print(f"make_tiny_hf: error: {args.out} exists and is not empty", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "kjv.txt")
        with gzip.open(os.path.join(REPO, "data", "corpus", "kjv.txt.gz"), "rt", encoding="utf-8") as f, \
                open(text, "w", encoding="utf-8") as out:
            out.write(f.read())
        print(f"[make_tiny_hf] training a {args.vocab_size}-piece sentencepiece tokenizer on the KJV corpus",
              flush=True)
        train_tokenizer([text], os.path.join(tmp, "tok"), args.vocab_size)
        save_tiny_model(args.architecture, args.out, seed=args.seed, vocab_size=args.vocab_size)
        sentencepiece_to_hf_dir(os.path.join(tmp, "tok.model"), args.out)
    files = sorted(os.listdir(args.out))
    print(f"[make_tiny_hf] wrote {args.architecture} to {args.out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
