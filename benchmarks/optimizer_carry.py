"""Reset vs carry of the Adam state through growth, at the demo's CPU scale; prints a table.

    python benchmarks/optimizer_carry.py [--workdir /tmp/opt_carry] [--base-iters 400] [--grown-iters 150]

1. a tokenizer and dataset from the shipped KJV corpus (the first 1.5 MB);
2. the base: the demo's CPU model (2 layers, 4 experts, top-1, hidden 64), constant LR 3e-3,
   trained from random init with its Adam state saved in model space;
3. for each of ``reset``, ``carry``, ``carry_zero_new``: ``grow_checkpoint`` (depth interposition
   x2, then width x2 with Gaussian noise alpha 0.01, top-k x2; the same seed, so the grown weights
   are identical in every arm), then the grown model trains on with the same recipe (constant LR
   3e-3, no warmup, the same batches); the only difference between the arms is the optimizer state.

Validation: the same 4 batches (4 x 16 x 64 tokens) of the validation split every time, right
after growth (before the first step) and every 10 steps; the table shows steps 0, 10, 50, 150.
2 ranks (EP = 2) on CPU with one thread each, as the demo runs.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_grow.parallel.spawn import run_in_processes  # noqa: E402

ARMS = ("reset", "carry", "carry_zero_new")
MODEL = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16,
    "num_moe_experts": 4, "moe_router_topk": 1, "moe_ffn_hidden_size": 64, "moe_router_score_function": "sigmoid",
    "moe_router_enable_expert_bias": True, "moe_router_load_balancing_type": "global_aux_loss",
    "moe_aux_loss_coeff": 1e-3, "qk_layernorm": True, "normalization": "RMSNorm", "vocab_size": 512,
    "make_vocab_size_divisible_by": 128, "seq_length": 64, "untie_embeddings_and_output_weights": True,
}
GROWTH = {"order": ["depth", "width"], "depth": {"mode": "interposition", "factor": 2},
          "width": {"factor": 2, "noise": "gaussian", "alpha": 0.01}, "seed": 1234}
REPORT_STEPS = (0, 10, 50, 150)


def prepare_data(workdir: str) -> dict:
    from megatron_grow.data.preprocess import preprocess
    from megatron_grow.data.tokenizer import train_tokenizer

    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    text = os.path.join(data, "kjv_1p5mb.txt")
    if not os.path.isfile(text):
        with gzip.open(os.path.join(REPO, "data", "corpus", "kjv.txt.gz"), "rt", encoding="utf-8") as f:
            body = f.read(1_500_000)
        with open(text, "w", encoding="utf-8") as f:
            f.write(body)
    if not os.path.isfile(os.path.join(data, "tok.model")):
        train_tokenizer([text], os.path.join(data, "tok"), 512, num_threads=2)
    if not os.path.isfile(os.path.join(data, "kjv.idx")):
        preprocess([text], os.path.join(data, "tok.model"), os.path.join(data, "kjv"), workers=2, append_eod=True,
                   progress=False)
    return {"data_path": [os.path.join(data, "kjv")], "tokenizer_model": os.path.join(data, "tok.model"),
            "split": "98,2,0"}


def write_recipe(path: str, data: dict, train_iters: int, load: str, save: str, growth: dict | None = None) -> str:
    raw = {
        "model": MODEL,
        "parallel": {"expert_model_parallel_size": 2},
        "training": {"micro_batch_size": 8, "global_batch_size": 16, "train_iters": train_iters, "lr": 3e-3,
                     "min_lr": 3e-3, "lr_decay_style": "constant", "lr_warmup_iters": 0, "eval_interval": 10,
                     "eval_iters": 4, "seed": 1234},
        "data": data,
        "checkpoint": {"load": load, "save": save, "save_interval": 100000, "keep_last": 1},
        "logging": {"log_interval": 50},
    }
    if growth is not None:
        raw["growth"] = growth
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return path


def base_body(recipe_path: str) -> dict:
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.training.trainer import Trainer

    run = Trainer(load_recipe(recipe_path), progress=False).run()
    return {"valid_losses": run.valid_losses}


def grow_and_train_body(source: str, grown: str, recipe_path: str) -> dict:
    """Offline growth (the recipe's growth: section, optimizer mode included), validation of the grown
    weights before any step, then training -- all as ``megatron-grow grow`` / ``train`` run them."""
    from megatron_grow.config.loader import load_recipe, recipe_to_dict
    from megatron_grow.growth.grow import grow_checkpoint
    from megatron_grow.growth.grown_model import grown_model_of
    from megatron_grow.training.trainer import Trainer

    recipe = load_recipe(recipe_path)
    grow_checkpoint(source, grown, recipe.growth, recipe.parallel, recipe_dict=recipe_to_dict(recipe),
                    overwrite=True, seed=recipe.training.seed, progress=False)
    model = grown_model_of(recipe.checkpoint.load, recipe.model, recipe.growth)
    ev = Trainer(recipe, model=model, progress=False)
    ev.build()
    ev.load_weights(recipe.checkpoint.load)
    ev.build_data()
    start = ev.evaluate()
    del ev
    run = Trainer(recipe, model=model, progress=False).run()
    return {"start": start, "valid_losses": run.valid_losses, "train_losses": run.train_losses}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/megatron_grow_opt_carry")
    p.add_argument("--base-iters", type=int, default=400)
    p.add_argument("--grown-iters", type=int, default=150)
    args = p.parse_args(argv)
    os.environ["PYTHONWARNINGS"] = "ignore"
    t0 = time.perf_counter()
    data = prepare_data(args.workdir)
    runs = os.path.join(args.workdir, "runs")
    base_dir = os.path.join(runs, "base")
    base = write_recipe(os.path.join(args.workdir, "base.yaml"), data, args.base_iters, base_dir, base_dir)
    print(f"[bench] base: {args.base_iters} steps", flush=True)
    spawn = dict(threads_per_rank=1, env={"OMP_NUM_THREADS": "1"}, timeout=1800)
    base_out = run_in_processes(base_body, 2, (base,), **spawn)[0]
    results = {}
    for arm in ARMS:
        init, out = os.path.join(runs, f"grown_init_{arm}"), os.path.join(runs, f"grown_{arm}")
        recipe = write_recipe(os.path.join(args.workdir, f"grown_{arm}.yaml"), data,
                              args.base_iters + args.grown_iters, init, out, dict(GROWTH, optimizer=arm))
        print(f"[bench] grow ({arm}) and train {args.grown_iters} steps", flush=True)
        results[arm] = run_in_processes(grow_and_train_body, 2, (base_dir, init, recipe), **spawn)[0]
    print(format_table(base_out, results, args.base_iters))
    print(f"[bench] total {time.perf_counter() - t0:.0f}s")
    return 0


def format_table(base_out: dict, results: dict, base_iters: int, steps: tuple = REPORT_STEPS,
                 arm_header: str = "optimizer") -> str:
    lines = [f"base validation loss at step {base_iters}: {base_out['valid_losses'][-1][1]:.4f}", "",
             f"| {arm_header} | " + " | ".join("after growth" if s == 0 else f"+{s} steps" for s in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for arm, r in results.items():
        by_step = {it - base_iters: loss for it, loss, _ in r["valid_losses"]}
        by_step[0] = r["start"]
        cells = [f"{by_step[s]:.4f}" if s in by_step else "-" for s in steps]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    first = {arm: r["train_losses"][0][1] for arm, r in results.items()}
    lines += ["", "first training loss after growth: " + ", ".join(f"{a} {v:.4f}" for a, v in first.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
