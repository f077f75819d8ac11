"""Export a torch_dist checkpoint (any layout) as a Hugging Face model directory.

    megatron-grow export-hf --load ROOT --hf-dir HF_DIR [--architecture Qwen3MoeForCausalLM]

One process, no GPU: tensors are read a layer (then an expert) at a time and written into
numbered safetensors shards with model.safetensors.index.json and config.json, loadable with
transformers' from_pretrained. The class is the one the checkpoint was imported from (also
through growth), else the first supported class that holds the model exactly; a model no class
holds is refused with the reasons. Tokenizer files are copied from --tokenizer, or from the HF
directory the checkpoint (or its growth source) was imported from. A tensor holding NaN or inf
is refused, naming it, and nothing is written (exit 2), unless --allow-nonfinite.
"""

from __future__ import annotations

import argparse

COMMAND = "export-hf"
INSTALLS_CPU_MODE = True  # never needed: it reads the files with torch alone, no Megatron-Core model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_grow.interop.hf.families import FAMILIES

    parser.add_argument("--load", required=True, help="checkpoint root (or an iter_N directory)")
    parser.add_argument("--hf-dir", required=True, help="output directory (must be empty or absent)")
    parser.add_argument("--architecture", choices=sorted(FAMILIES), default=None,
                        help="transformers class to write (default: see above)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="tensor dtype in the safetensors files (auto: as stored)")
    parser.add_argument("--tokenizer", default=None, help="directory whose tokenizer files are copied along")
    parser.add_argument("--max-shard-size-mb", type=float, default=2048.0, help="safetensors shard size cap")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --hf-dir")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="export tensors holding NaN or inf (refused by default, naming the tensor)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from megatron_grow.interop.hf.exporter import export_hf

    s = export_hf(args.load, args.hf_dir, architecture=args.architecture, dtype=args.dtype,
                  tokenizer=args.tokenizer, max_shard_bytes=int(args.max_shard_size_mb * 2**20),
                  overwrite=args.overwrite, progress=not args.quiet, allow_nonfinite=args.allow_nonfinite)
    print("export-hf summary")
    for key, value in (("checkpoint", s["checkpoint"]), ("hf dir", f"{s['hf_dir']} ({s['architecture']})"),
                       ("tensors", f"{s['tensors']} in {s['shards']} shard(s), {s['dtype']}, "
                                   f"{s['bytes_written'] / 2**20:,.1f} MiB"),
                       ("tokenizer", ", ".join(s["tokenizer_files"]) or "none copied"),
                       ("time", f"{s['seconds']:.2f}s")):
        print(f"  {key:<10} {value}")
    return 0
