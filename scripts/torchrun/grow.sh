#!/usr/bin/env bash
# Grow a checkpoint on one node with torchrun (offline `megatron-grow grow`).
#
#   scripts/torchrun/grow.sh [--dry-run] --load SRC --save DST --recipe RECIPE.yaml \
#       [--expert-model-parallel-size N ...] [key.sub=value ...]
#
# Every argument except --dry-run goes to `megatron-grow grow` unchanged. Processes: $NPROC,
# else the GPUs `nvidia-smi -L` lists, else 1 (the target layout must fit that world size).
# --dry-run prints the launch command only. Extra torchrun options: TORCHRUN_ARGS.
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
for flag in --load --save --recipe; do
    [[ " ${args[*]-} " == *" $flag "* || " ${args[*]-} " == *" $flag="* ]] \
        || { echo "error: grow.sh needs $flag (try --help)" >&2; exit 2; }
done

read -r -a extra <<< "${TORCHRUN_ARGS:-}"
# `megatron-grow launch` is torchrun (same options) that keeps the workers' exit codes (2 bad input,
# 3 preempted and saved) and forwards SIGTERM/SIGUSR1 to them (docs/launching.md).
cmd=("${PYTHON:-python}" -m megatron_grow launch --standalone --nnodes 1 --nproc-per-node "$(mg_nproc)"
     "${extra[@]}" grow "${args[@]}")
if [[ "$dry_run" == 1 ]]; then
    mg_print_cmd "${cmd[@]}"
    exit 0
fi
exec "${cmd[@]}"
