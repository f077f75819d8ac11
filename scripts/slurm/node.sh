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
# script forwards it to every rank (rank.sh and the trainer it runs); rank.sh records each rank's exit code, and this script exits 3 if any local rank
# exited 3, else, when torchrun failed, with the first failing local rank's code (2 = bad
# input). With proctrack/cgroup SLURM also signals the ranks directly, so a rank may see
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

# shellcheck disable=SC2317,SC2329  # called from the USR1 trap
# The ranks are torchrun's children (rank.sh, which ignores SIGUSR1) and their children (the
# trainer). Only those processes, not their process groups: a rank's helpers (the C++
# compiler torch.compile runs at start-up, data workers) would die of SIGUSR1.
signal_ranks() {
    local child grandchild
    for child in $(pgrep -P "$launcher_pid" || true); do
        kill -USR1 "$child" 2>/dev/null || true
        for grandchild in $(pgrep -P "$child" || true); do
            kill -USR1 "$grandchild" 2>/dev/null || true
        done
    done
}

# A rank ignores SIGUSR1 until the trainer has installed its handler, so a warning that arrives
# while the ranks are still starting would be lost: after the first SIGUSR1, repeat it every
# 2 s until torchrun exits (the handler only sets a flag, and the trainer puts SIG_IGN back
# when it leaves its loop, so repeats are harmless).
resender_pid=""
# shellcheck disable=SC2317,SC2329  # invoked by the trap below
forward_usr1() {
    echo "[node.sh $(hostname)] SIGUSR1: forwarding to the ranks of torchrun pid $launcher_pid" >&2
    signal_ranks
    if [[ -z "$resender_pid" ]]; then
        ( trap '' USR1   # SLURM may signal every process of the step again
          trap - TERM
          while kill -0 "$launcher_pid" 2>/dev/null; do sleep 2; signal_ranks; done ) &
        resender_pid=$!
    fi
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

[[ -n "$resender_pid" ]] && { kill "$resender_pid" 2>/dev/null || true; }
shopt -s nullglob
failed=""
for f in "$MG_RANK_STATUS_DIR"/rank-*.rc; do
    code="$(cat "$f")"
    if [[ "$code" == "$MG_EXIT_PREEMPTED" ]]; then
        echo "[node.sh $(hostname)] a rank exited $MG_EXIT_PREEMPTED (preempted, checkpoint saved)" >&2
        exit "$MG_EXIT_PREEMPTED"
    fi
    [[ "$code" != 0 && -z "$failed" ]] && failed="$code"
done
# torchrun says 1 for any failure; the ranks' own code (2 = bad input) tells the user more.
if [[ "$rc" != 0 && -n "$failed" ]]; then
    echo "[node.sh $(hostname)] a rank exited $failed" >&2
    exit "$failed"
fi
exit "$rc"
