"""What bf16 rounding does to width-growth noise: measured on a real ``megatron-grow grow`` of a bf16 source.

    python scripts/bf16_noise_rounding.py --workdir /tmp/bf16_noise [--alpha 0.01] [--recipe ...]

Writes a bf16 source (the recipe's model, Megatron-Core's own random init, saved as a bf16 training run
stores its weights), grows it with ``megatron-grow grow`` (``--dtype auto``: a bf16 checkpoint) with
the recipe's width growth at ``--alpha`` and per-expert noise, then compares every routed-expert
copy with its original in the grown checkpoint: the share of elements the rounding left equal to the
original, and the std of ``fp32(copy) - fp32(original)`` over the intended ``alpha * std`` of that
source expert (the std definition of docs/growth.md). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def write_source(recipe_path: str, root: str) -> None:
    import torch

    from megatron_grow.checkpoint import io
    from megatron_grow.checkpoint.manifest import build_manifest, empty_counters
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.config.schema import ParallelConfig
    from megatron_grow.models.builder import build_model_chunks
    from megatron_grow.parallel.init import destroy_distributed, initialize_distributed

    model = load_recipe(recipe_path).model
    initialize_distributed(ParallelConfig(), seed=1234)
    chunks = build_model_chunks(model, ParallelConfig(), params_dtype=torch.bfloat16)
    io.save_checkpoint(root, 1, io.model_sharded_state_dict(chunks),
                       build_manifest(model=model, layout={}, counters=empty_counters(), lineage=[]))
    destroy_distributed()


def measure(source_root: str, grown_root: str, alpha: float, experts: int) -> dict:
    import torch

    from megatron_grow.checkpoint.reader import CheckpointReader

    src, out = CheckpointReader(source_root), CheckpointReader(grown_root)
    result = {}
    for name in ("linear_fc1", "linear_fc2"):
        key = f"decoder.layers.mlp.experts.experts.{name}.weight"
        s, g = src.read(key), out.read(key)
        assert g.dtype == torch.bfloat16, g.dtype
        changed = total = 0
        ratios = []
        for layer in range(g.shape[0]):
            for e in range(experts, g.shape[1]):
                original, copy = g[layer, e % experts], g[layer, e]
                delta = copy.float() - original.float()
                changed += int((delta != 0).sum())
                total += delta.numel()
                intended = alpha * float(f"{s[layer, e % experts].double().std().item():.6g}")
                ratios.append(delta.double().std().item() / intended)
        result[name] = {"copy_elements": total, "share_changed": changed / total,
                        "noise_std_over_intended": sum(ratios) / len(ratios),
                        "min_ratio": min(ratios), "max_ratio": max(ratios)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--recipe", default="configs/growth/tiny_width.yaml")
    parser.add_argument("--alpha", type=float, default=0.01)
    args = parser.parse_args()
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.platform import cpu

    cpu.apply_cpu_adaptations()
    source, grown = os.path.join(args.workdir, "source"), os.path.join(args.workdir, "grown")
    write_source(args.recipe, source)
    subprocess.run([sys.executable, "-m", "megatron_grow", "grow", "--load", source, "--save", grown, "--overwrite",
                    "--recipe", args.recipe, "--no-verify", "--quiet", f"growth.width.alpha={args.alpha}",
                    "growth.width.noise_granularity=per_expert"], check=True,
                   env={k: v for k, v in os.environ.items() if k not in DIST_ENV})  # its own process group
    experts = load_recipe(args.recipe).model.num_moe_experts
    print(json.dumps({"recipe": args.recipe, "alpha": args.alpha, **measure(source, grown, args.alpha, experts)},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
