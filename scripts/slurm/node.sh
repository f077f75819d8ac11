#!/usr/bin/env bash
# One SLURM task per node: run torchrun so that a preemption signal reaches the trainer
# ranks (not torchrun), and turn "a rank exited 3" back into exit code 3.
#
#   srun --ntasks-per-node=1 bash scripts/slurm/node.sh torchrun ... --no-python \
#       bash scripts/slurm/rank.sh python -u -m megatron_grow train ...
#
# Why: torchrun (torch.distributed.elastic) does not handle SIGUSR1, so the signal that
# `#SBATCH --signal=USR1@300` sends would kill it and, with it, the ranks mid-save. And
# torchrun exits 1 whatever code its workers exit with, so the trainer's "preempted and
# saved" code 3 would be lost. Here torchrun runs with SIGUSR1 ignored; on SIGUSR1 this
# script forwards it to every rank's process group (torchrun starts each worker in its own
# session); rank.sh records each rank's exit code, and this script exits 3 if any local rank
# exited 3. With proctrack/cgroup SLURM also signals the ranks directly, so a rank may see
# SIGUSR1 twice; the trainer's handler only sets a flag, so that is harmless.
set -uo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 torchrun [torchrun args] --no-python bash scripts/slurm/rank.sh COMMAND..." >&2
    exit 2
fi

MG_EXIT_PREEMPTED=3
MG_RANK_STATUS_DIR="$(mktemp -d "${TMPDIR:-/tmp}/mg-ranks.XXXXXX")"
export MG_RANK_STATUS_DIR
trap 'rm -rf "$MG_RANK_STATUS_DIR"' EXIT

# SIG_IGN survives exec, so torchrun starts with SIGUSR1 ignored (it installs no handler for it).
( trap '' USR1; exec "$@" ) &
launcher_pid=$!

# shellcheck disable=SC2317,SC2329  # invoked by the trap below
forward_usr1() {
    echo "[node.sh $(hostname)] SIGUSR1: forwarding to the ranks of torchrun pid $launcher_pid" >&2
    local child
    for child in $(pgrep -P "$launcher_pid" || true); do
        kill -USR1 -- "-$child" 2>/dev/null || kill -USR1 "$child" 2>/dev/null || true
    done
}
trap forward_usr1 USR1
# SIGTERM (time limit, scancel): pass it on and keep waiting for the ranks to save and exit.
trap 'kill -TERM "$launcher_pid" 2>/dev/null || true' TERM

# `wait` returns early when a trapped signal arrives; keep waiting until torchrun is gone.
rc=0
while :; do
    wait "$launcher_pid"
    rc=$?
    kill -0 "$launcher_pid" 2>/dev/null || break
done

shopt -s nullglob
for f in "$MG_RANK_STATUS_DIR"/rank-*.rc; do
    if [[ "$(cat "$f")" == "$MG_EXIT_PREEMPTED" ]]; then
        echo "[node.sh $(hostname)] a rank exited $MG_EXIT_PREEMPTED (preempted, checkpoint saved)" >&2
        exit "$MG_EXIT_PREEMPTED"
    fi
done
exit "$rc"
