"""Top-k doubled vs expert upcycling (top-k fixed) uniform vs by utility, at demo scale, one seed.

    PYTHONPATH=$PWD .venv/bin/python scripts/upcycle_comparison.py --workdir /tmp/upcycle_cmp \\
        --out docs/results/upcycle_comparison.json

1. data: a 512-token sentencepiece model and the first 300 KB of the KJV corpus as an indexed dataset;
2. base: the tiny MoE (configs/models/tiny.yaml: 4 layers, 8 experts, top-2, sigmoid + expert bias)
   trained 100 steps from random init;
3. route-stats of the base on 16384 training tokens (the file growth.upcycle.utility_stats reads);
4. three growths at start-up (``train --grow-from``), each trained 100 more steps with a fresh optimizer:
   width x2 with top-k x2 (gaussian alpha 0.01), upcycle to 16 experts uniform, upcycle to 16 by utility
   (both top-2, bias_noise 0.01), and the same two to 12 experts.

Reported per run: the copies per source expert (growth.upcycle's allocation), the training loss of
its first step (the grown weights, before any update: the loss right after growth), the mean
training loss of its last 10 steps, and the validation loss at step 200.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os

import yaml

from megatron_grow.config.schema import ParallelConfig
from megatron_grow.parallel.spawn import run_in_processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROWTHS = {
    "topk_doubled": {"width": {"factor": 2, "noise": "gaussian", "alpha": 0.01}},
    "upcycle_uniform": {"upcycle": {"num_experts": 16, "allocation": "uniform", "bias_noise": 0.01}},
    "upcycle_utility": {"upcycle": {"num_experts": 16, "allocation": "utility", "bias_noise": 0.01}},
    "upcycle12_uniform": {"upcycle": {"num_experts": 12, "allocation": "uniform", "bias_noise": 0.01}},
    "upcycle12_utility": {"upcycle": {"num_experts": 12, "allocation": "utility", "bias_noise": 0.01}},
}


def prepare_data(root: str) -> dict:
    from megatron_grow.data.preprocess import preprocess
    from megatron_grow.data.tokenizer import train_tokenizer

    os.makedirs(root, exist_ok=True)
    if not os.path.exists(os.path.join(root, "kjv.idx")):
        text = os.path.join(root, "kjv_part.txt")
        with gzip.open(os.path.join(REPO, "data", "corpus", "kjv.txt.gz"), "rt", encoding="utf-8") as f:
            open(text, "w", encoding="utf-8").write(f.read(300_000))
        train_tokenizer([text], os.path.join(root, "tok"), 512)
        preprocess([text], os.path.join(root, "tok.model"), os.path.join(root, "kjv"), workers=1)
    return {"tokenizer": os.path.join(root, "tok.model"), "prefix": os.path.join(root, "kjv")}


def write_recipe(path: str, data: dict, run_dir: str, train_iters: int, growth: dict | None = None) -> str:
    recipe = {
        "include": os.path.join(REPO, "configs", "models", "tiny.yaml"),
        "model": {"vocab_size": 512, "seq_length": 64},
        "training": {"micro_batch_size": 4, "global_batch_size": 8, "train_iters": train_iters, "lr": 3.0e-3,
                     "min_lr": 3.0e-4, "lr_decay_style": "constant", "eval_interval": 100, "eval_iters": 8,
                     "seed": 1234},
        "data": {"data_path": [data["prefix"]], "tokenizer_model": data["tokenizer"], "split": "95,5,0",
                 "eval_samples": 64},
        "checkpoint": {"save": run_dir, "load": run_dir, "save_interval": 100, "keep_last": 2},
        "logging": {"log_interval": 50},
    }
    if growth is not None:
        recipe["growth"] = growth
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path


def train_body(recipe_path: str, grow_from: str | None = None) -> dict:
    from megatron_grow.cli import _grow_from
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.training.trainer import Trainer

    recipe = load_recipe(recipe_path)
    model, initialize = recipe.model, None
    if grow_from:
        args = argparse.Namespace(config=recipe_path, grow_from=grow_from, source_config=None, overrides=[])
        model, initialize = _grow_from.growth_initializer(args, recipe)
    run = Trainer(recipe, model=model, initialize=initialize).run()
    return {"train_losses": run.train_losses, "valid_losses": run.valid_losses, "iteration": run.iteration}


def stats_body(load: str, prefix: str, out: str) -> None:
    from megatron_grow.growth.route_stats import route_stats, write_stats

    write_stats(out, route_stats(load, prefix, ParallelConfig(), tokens=16384, micro_batch=4))


def _summary(result: dict) -> dict:
    values = [loss for _, loss in result["train_losses"]]  # (iteration, loss), in order
    return {"first_step_loss": values[0], "last10_mean_loss": sum(values[-10:]) / len(values[-10:]),
            "valid_losses": [list(v) for v in result["valid_losses"]], "iteration": result["iteration"]}


def _copies(growth: dict, stats: str) -> list | None:
    """Copies per source expert in each layer of an upcycle section (the allocation rule of
    growth.operators.upcycle: each layer by its own routing shares)."""
    from megatron_grow.config.route_stats import read_route_stats
    from megatron_grow.growth.operators.upcycle import allocate_copies

    section = growth.get("upcycle")
    if section is None:
        return None
    shares = read_route_stats(stats, "stats")["shares"]
    rows = shares if section["allocation"] == "utility" else [[1.0] * 8] * len(shares)
    return [list(allocate_copies(row, section["num_experts"] - 8)) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    data = prepare_data(os.path.join(args.workdir, "data"))
    base_dir = os.path.join(args.workdir, "base")
    base = run_in_processes(train_body, 1, (write_recipe(os.path.join(args.workdir, "base.yaml"), data, base_dir,
                                                         100),), timeout=3600)[0]
    stats = os.path.join(args.workdir, "stats.json")
    run_in_processes(stats_body, 1, (base_dir, data["prefix"], stats), timeout=3600)
    results = {"base": _summary(base), "route_stats": json.load(open(stats))}
    for name, growth in GROWTHS.items():
        growth = json.loads(json.dumps(growth))
        if "upcycle" in growth and growth["upcycle"]["allocation"] == "utility":
            growth["upcycle"]["utility_stats"] = stats
        recipe = write_recipe(os.path.join(args.workdir, f"{name}.yaml"), data, os.path.join(args.workdir, name),
                              200, growth)
        grown = run_in_processes(train_body, 1, (recipe, base_dir), timeout=3600)[0]
        results[name] = {"growth": growth, "copies": _copies(growth, stats), **_summary(grown)}
        print(name, {k: v for k, v in results[name].items() if k != "growth"}, flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
