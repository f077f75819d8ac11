"""Import a Hugging Face MoE (safetensors + config.json) as a torch_dist checkpoint, in any layout.

    megatron-grow import-hf --hf-dir HF_DIR --save ROOT
    torchrun --nproc-per-node 2 -m megatron_grow import-hf --hf-dir HF_DIR --save ROOT \\
        --expert-model-parallel-size 2

The supported classes are listed below (``interop/hf/families``; dense layers, shared experts,
multi-latent attention and grouped routing where the class has them); anything a class has that
our model cannot reproduce exactly is refused with the reason. Every rank reads only the slices
of the HF tensors it holds; ROOT/iter_0000000 appears only once complete, with megatron_grow.json
recording the architecture and where it came from (docs/interop.md).
"""

from __future__ import annotations

import argparse

from megatron_grow.cli._common import add_layout_arguments, layout_from_args
from megatron_grow.interop.hf.families import FAMILIES

COMMAND = "import-hf"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--save", required=True, help="destination checkpoint root")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="model.seq_length to record (default: max_position_embeddings, at most 4096)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the checkpoint's weights dtype (default auto: bf16 for bf16 safetensors, else fp32; "
                             "so import -> export-hf returns the same bytes)")
    parser.add_argument("--drop-mtp", action="store_true",
                        help="import without the multi-token-prediction layers the files store past "
                             "num_hidden_layers (GLM-4.5, DeepSeek-V3); refused otherwise, since they cannot be "
                             "represented and would be left behind")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --save directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_layout_arguments(parser)
    parser.epilog = "supported classes: " + ", ".join(FAMILIES)


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_grow.config.schema import ParallelConfig
    from megatron_grow.interop.hf.importer import import_hf
    from megatron_grow.parallel.init import destroy_distributed

    parallel = layout_from_args(args, ParallelConfig())
    try:
        summary = import_hf(args.hf_dir, args.save, parallel, seq_length=args.seq_length,
                            overwrite=args.overwrite, progress=not args.quiet, dtype=args.dtype,
                            drop_mtp=args.drop_mtp)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            m = summary["model"]
            print("import-hf summary")
            for key, value in (
                    ("source", f"{summary['hf_dir']} ({summary['architecture']})"),
                    ("checkpoint", summary["checkpoint"]),
                    ("model", f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_moe_experts} experts "
                              f"(top-{m.moe_router_topk}, {m.moe_router_score_function} router), "
                              f"vocab {m.vocab_size}"),
                    ("layout", f"{summary['layout']} ({summary['world_size']} ranks)"),
                    ("bytes read", f"{summary['bytes_read'] / 2**20:,.1f} MiB (all ranks)"),
                    ("left out", f"multi-token-prediction layer(s) {summary['dropped_layers']} (--drop-mtp)"
                                 if summary["dropped_layers"] else "nothing"),
                    ("time", f"{summary['seconds']:.2f}s")):
                print(f"  {key:<11} {value}")
    finally:
        destroy_distributed()
    return 0
