#!/usr/bin/env bash
# Train on one node with torchrun.
#
#   scripts/torchrun/train.sh [--dry-run] --config RECIPE.yaml [--grow-from SRC] [key.sub=value ...]
#   NPROC=2 scripts/torchrun/train.sh --config configs/models/tiny.yaml training.train_iters=10
#
# Every argument except --dry-run goes to `megatron-grow train` unchanged. Processes: $NPROC,
# else the GPUs `nvidia-smi -L` lists, else 1. --dry-run prints the torchrun command only.
# Extra torchrun options: TORCHRUN_ARGS="--master-port 29600" (split on spaces).
# Exit code: the trainer's (0 done, 2 bad input, 3 stopped by SIGTERM/SIGUSR1 after saving), kept
# through torchrun by `megatron-grow launch`. Python: $PYTHON (default: python).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/torchrun/common.sh
source "$here/common.sh"

dry_run=0
args=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) args+=("$arg") ;;
    esac
done
[[ " ${args[*]-} " == *" --config "* || " ${args[*]-} " == *" --config="* ]] \
    || { echo "error: train.sh needs --config RECIPE.yaml (try --help)" >&2; exit 2; }

read -r -a extra <<< "${TORCHRUN_ARGS:-}"
# `megatron-grow launch` is torchrun (same options) that keeps the workers' exit codes (2 bad input,
# 3 preempted and saved) and forwards SIGTERM/SIGUSR1 to them (docs/launching.md).
cmd=("${PYTHON:-python}" -m megatron_grow launch --standalone --nnodes 1 --nproc-per-node "$(mg_nproc)"
     "${extra[@]}" train "${args[@]}")
if [[ "$dry_run" == 1 ]]; then
    mg_print_cmd "${cmd[@]}"
    exit 0
fi
exec "${cmd[@]}"
