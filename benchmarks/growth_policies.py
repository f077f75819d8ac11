"""Moment policies and LR re-warmup after growth, at the demo's CPU scale (one seed); prints a table
and writes the raw numbers as JSON.

    python benchmarks/growth_policies.py [--workdir /tmp/growth_policies] [--base-iters 400] \\
        [--grown-iters 100] [--json docs/results/growth_policies.json]

The base, data, growth (depth interposition x2 then width x2, gaussian alpha 0.01, top-k x2, the
same seed in every arm, so the grown weights are identical) and the grown runs' recipe are
``benchmarks/optimizer_carry.py``'s (constant LR 3e-3, 2 ranks EP = 2). The arms differ only in
``growth.optimizer`` / ``growth.optimizer_policy`` and ``training.lr_rewarmup_iters``:

* ``reset``, ``carry``: as in docs/growth.md;
* ``policy``: SPARKLING's asymmetric reset: copies' first moments reset, second moments carried,
  originals carried;
* ``*+rewarmup``: the same, with the LR re-warmed linearly from 0 over 20 steps after growth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import yaml  # noqa: E402

from benchmarks.optimizer_carry import GROWTH, base_body, grow_and_train_body, prepare_data, write_recipe  # noqa: E402
from benchmarks.optimizer_carry import format_table as carry_table  # noqa: E402
from megatron_grow.parallel.spawn import run_in_processes  # noqa: E402

SPARKLING = {"originals": {"exp_avg": "copy", "exp_avg_sq": "copy"},
             "copies": {"exp_avg": "reset", "exp_avg_sq": "copy"}}
REWARMUP = 20
ARMS = {
    "reset": ({"optimizer": "reset"}, None),
    "carry": ({"optimizer": "carry"}, None),
    "policy": ({"optimizer": "policy", "optimizer_policy": SPARKLING}, None),
    "reset+rewarmup": ({"optimizer": "reset"}, REWARMUP),
    "policy+rewarmup": ({"optimizer": "policy", "optimizer_policy": SPARKLING}, REWARMUP),
}
REPORT_STEPS = (0, 10, 50, 100)


def _arm_recipe(path: str, data: dict, iters: int, init: str, out: str, growth: dict, rewarmup) -> str:
    write_recipe(path, data, iters, init, out, dict(GROWTH, **growth))
    if rewarmup is not None:
        with open(path) as f:
            raw = yaml.safe_load(f)
        raw["training"]["lr_rewarmup_iters"] = rewarmup
        with open(path, "w") as f:
            yaml.safe_dump(raw, f, sort_keys=False)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/megatron_grow_growth_policies")
    p.add_argument("--base-iters", type=int, default=400)
    p.add_argument("--grown-iters", type=int, default=100)
    p.add_argument("--json", default=None, help="write the raw results here")
    args = p.parse_args(argv)
    os.environ["PYTHONWARNINGS"] = "ignore"
    t0 = time.perf_counter()
    data = prepare_data(args.workdir)
    runs = os.path.join(args.workdir, "runs")
    base_dir = os.path.join(runs, "base")
    base = write_recipe(os.path.join(args.workdir, "base.yaml"), data, args.base_iters, base_dir, base_dir)
    spawn = dict(threads_per_rank=1, env={"OMP_NUM_THREADS": "1"}, timeout=3600)
    print(f"[bench] base: {args.base_iters} steps", flush=True)
    base_out = run_in_processes(base_body, 2, (base,), **spawn)[0]
    results = {}
    for arm, (growth, rewarmup) in ARMS.items():
        name = arm.replace("+", "_")
        init, out = os.path.join(runs, f"grown_init_{name}"), os.path.join(runs, f"grown_{name}")
        recipe = _arm_recipe(os.path.join(args.workdir, f"grown_{name}.yaml"), data,
                             args.base_iters + args.grown_iters, init, out, growth, rewarmup)
        print(f"[bench] grow ({arm}) and train {args.grown_iters} steps", flush=True)
        results[arm] = run_in_processes(grow_and_train_body, 2, (base_dir, init, recipe), **spawn)[0]
    print(format_table(base_out, results, args.base_iters))
    seconds = time.perf_counter() - t0
    print(f"[bench] total {seconds:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/growth_policies.py " + " ".join(argv or sys.argv[1:]),
                       "arms": {a: {"growth": g, "lr_rewarmup_iters": r} for a, (g, r) in ARMS.items()},
                       "base_valid_losses": base_out["valid_losses"], "results": results,
                       "seconds": round(seconds)}, f, indent=1)
    return 0


def format_table(base_out: dict, results: dict, base_iters: int) -> str:
    return carry_table(base_out, results, base_iters, steps=REPORT_STEPS, arm_header="arm")


if __name__ == "__main__":
    sys.exit(main())
