#!/usr/bin/env bash
# Sunk-cost sweep (docs/paper.md §6.2): grow every checkpoint of a run and train each grown
# model for the same extra compute, on one node.
#
#   scripts/torchrun/sunk_cost_sweep.sh --run-dir CKPT/3b_base --out CKPT/sunk_cost \
#       [--recipe configs/recipes/ablations/sunk_cost_sweep.yaml] [--every 8000] \
#       [--extra-flops 3e20 | --extra-steps N] [--grow-only] [--dry-run] [-- key.sub=value ...]
#
# For each RUN_DIR/iter_NNNNNNN (ascending; N > 0 and, with --every K, N % K == 0):
#   1. scripts/torchrun/grow.sh --load RUN_DIR/iter_N --save OUT/from_iter_N --recipe RECIPE
#      (skipped when OUT/from_iter_N already holds a checkpoint)
#   2. scripts/torchrun/train.sh --config RECIPE --grow-from RUN_DIR/iter_N
#      checkpoint.load=OUT/from_iter_N checkpoint.save=OUT/from_iter_N
#      training.train_iters=N+EXTRA [overrides after --]
# EXTRA = ceil(extra FLOPs / FLOPs per step of the grown model), computed with
# megatron_grow.training.flops (3e20 -> 8,133 steps for the 3B -> 6B depth recipe), unless
# --extra-steps is given. Training resumes from OUT/from_iter_N, so rerunning the sweep
# continues unfinished points. --dry-run prints every command and runs none (nothing is
# created). Python for the FLOPs: $PYTHON (default: python).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/torchrun/common.sh
source "$here/common.sh"

recipe=configs/recipes/ablations/sunk_cost_sweep.yaml
run_dir="" out="" every=0 extra_flops=3e20 extra_steps="" grow_only=0 dry_run=0
overrides=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --run-dir) run_dir="${2:?--run-dir needs a directory}"; shift 2 ;;
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --recipe) recipe="${2:?--recipe needs a file}"; shift 2 ;;
        --every) every="${2:?--every needs a step count}"; shift 2 ;;
        --extra-flops) extra_flops="${2:?--extra-flops needs a number}"; shift 2 ;;
        --extra-steps) extra_steps="${2:?--extra-steps needs a number}"; shift 2 ;;
        --grow-only) grow_only=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; overrides=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "error: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
[[ -n "$run_dir" ]] || { echo "error: --run-dir is required" >&2; exit 2; }
[[ -n "$out" ]] || { echo "error: --out is required" >&2; exit 2; }
[[ -d "$run_dir" ]] || { echo "error: --run-dir $run_dir is not a directory" >&2; exit 2; }
[[ -f "$recipe" ]] || { echo "error: recipe $recipe not found" >&2; exit 2; }
[[ "$every" =~ ^[0-9]+$ ]] || { echo "error: --every must be a whole number" >&2; exit 2; }

if [[ -z "$extra_steps" ]]; then
    extra_steps="$("${PYTHON:-python}" - "$recipe" "$extra_flops" <<'PY'
import dataclasses, math, sys
from megatron_grow.config.loader import load_recipe
from megatron_grow.growth.plan import make_growth_plan
from megatron_grow.training.flops import training_flops_per_step

recipe = load_recipe(sys.argv[1])
model = recipe.model
if recipe.growth is not None:
    model = make_growth_plan(model, recipe.growth).target
per_step = training_flops_per_step(model, recipe.training.global_batch_size)
print(math.ceil(float(sys.argv[2]) / per_step))
PY
)"
fi
[[ "$extra_steps" =~ ^[0-9]+$ ]] || { echo "error: extra steps '$extra_steps' is not a whole number" >&2; exit 2; }
echo "# extra steps per sweep point: $extra_steps" >&2

shopt -s nullglob
points=()
for dir in "$run_dir"/iter_*; do
    [[ -d "$dir" ]] || continue
    digits="${dir##*/iter_}"
    [[ "$digits" =~ ^[0-9]+$ ]] || continue
    n=$((10#$digits))
    (( n > 0 )) || continue
    (( every == 0 || n % every == 0 )) || continue
    points+=("$n:$dir")
done
if [[ ${#points[@]} -eq 0 ]]; then
    what="no iter_* checkpoints (N > 0) in $run_dir"
    (( every > 0 )) && what+=" with N a multiple of $every"
    echo "error: $what" >&2
    exit 2
fi
mapfile -t points < <(printf '%s\n' "${points[@]}" | sort -t: -k1,1n)

run() {
    if [[ "$dry_run" == 1 ]]; then
        mg_print_cmd "$@"
    else
        echo "+ $(mg_print_cmd "$@")" >&2
        "$@"
    fi
}

for point in "${points[@]}"; do
    n="${point%%:*}"
    src="${point#*:}"
    dst="$out/from_${src##*/}"
    if [[ -f "$dst/latest_checkpointed_iteration.txt" ]]; then
        echo "# $dst already holds a checkpoint: not growing again" >&2
    else
        run "$here/grow.sh" --load "$src" --save "$dst" --recipe "$recipe"
    fi
    [[ "$grow_only" == 1 ]] && continue
    run "$here/train.sh" --config "$recipe" --grow-from "$src" \
        "checkpoint.load=$dst" "checkpoint.save=$dst" "training.train_iters=$((n + extra_steps))" \
        "${overrides[@]}"
done
