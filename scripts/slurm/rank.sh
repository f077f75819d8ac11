#!/usr/bin/env bash
# One rank under `torchrun --no-python`: run COMMAND, write its exit code to
# $MG_RANK_STATUS_DIR/rank-$RANK.rc for node.sh (torchrun itself only ever exits 0 or 1),
# and exit with the same code.
#
# SIGUSR1 is ignored here and by inheritance in COMMAND until the trainer installs its own
# handler (a Python handler replaces an inherited SIG_IGN), so a signal that arrives while
# the trainer is still importing is dropped instead of killing it. SIGTERM gets a no-op trap
# (traps are reset on exec, so COMMAND keeps the default or its own handler): this shell
# survives long enough to record the exit code.
set -u
if [[ $# -eq 0 ]]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
trap '' USR1
trap ':' TERM
"$@"
rc=$?
if [[ -n "${MG_RANK_STATUS_DIR:-}" && -d "$MG_RANK_STATUS_DIR" ]]; then
    echo "$rc" > "$MG_RANK_STATUS_DIR/rank-${RANK:-${LOCAL_RANK:-0}}.rc"
fi
exit "$rc"
