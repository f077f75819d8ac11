#!/usr/bin/env bash
# Reproduce the demo numbers in docs/demo.md: run `megatron-grow demo` and record the wall time,
# the machine and its load average next to the demo's own results.json.
#
#   scripts/repro/demo.sh                         # full CPU demo into runs/demo
#   scripts/repro/demo.sh --reduced --workdir runs/demo_reduced
#
# Every argument goes to `megatron-grow demo` unchanged (default --workdir runs/demo).
# Writes WORKDIR/repro.txt: date, command, cores, load average before/after, wall seconds.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
mg="$repo/.venv/bin/megatron-grow"
[[ -x "$mg" ]] || mg="megatron-grow"

workdir="runs/demo"
prev=""
for arg in "$@"; do
    [[ "$prev" == "--workdir" ]] && workdir="$arg"
    [[ "$arg" == --workdir=* ]] && workdir="${arg#--workdir=}"
    prev="$arg"
done
[[ " $* " == *" --workdir"* ]] || set -- --workdir "$workdir" "$@"

load_before="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
start="$(date +%s.%N)"
"$mg" demo "$@"
end="$(date +%s.%N)"
load_after="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
wall="$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')"
mkdir -p "$workdir"
{
    echo "date:        $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "command:     $mg demo $*"
    echo "cores:       $(nproc)"
    echo "load before: $load_before"
    echo "load after:  $load_after"
    echo "wall s:      $wall"
} | tee "$workdir/repro.txt"
