#!/usr/bin/env bash
# The GPU check in one call of at most ~7 minutes (benchmarks/gpu_bench.py; docs/gpu.md says what
# each number means): install the carried wheels for this image's Python, preflight (stops with
# exit code 2 without CUDA), then the phases, each under its own time limit, each writing
# OUT/phases/NN_name.json the moment it ends (summary.json and summary.md are rewritten each time).
#
#   scripts/gpu/check.sh --out DIR [--bundle DIR] [--dry-run] [--phases P1,P2] [--phase-limit P=S]
#
# --bundle: the folder made beforehand on CPU (scripts/gpu/make_bundle.sh): wheels/ for every
# supported Python (pip picks this Python's), data/ (tokenizer and indexed dataset).
# --dry-run: the same phases on tiny shapes (CPU is fine); with --bundle it also proves the folder
# complete. Exit code: 0 every phase ran, 1 a phase failed or timed out, 2 no CUDA or bad arguments.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="" BUNDLE=""
BENCH_ARGS=()
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "check.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) [[ $# -ge 2 ]] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
    --bundle) [[ $# -ge 2 ]] || die "--bundle needs a folder"; BUNDLE="$2"; shift 2 ;;
    --dry-run) BENCH_ARGS+=(--dry-run); shift ;;
    --phases) [[ $# -ge 2 ]] || die "--phases needs a comma-separated list"; BENCH_ARGS+=(--phases "$2"); shift 2 ;;
    --phase-limit) [[ $# -ge 2 && "$2" =~ ^[a-z_]+=[0-9.]+$ ]] || die "--phase-limit needs PHASE=SECONDS"
                   BENCH_ARGS+=(--phase-limit "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$OUT" ]] || die "--out DIR is required"
[[ -z "$BUNDLE" || -d "$BUNDLE" ]] || die "--bundle $BUNDLE is not a folder"
mkdir -p "$OUT" || die "cannot create $OUT"
OUT="$(cd "$OUT" && pwd)"
[[ -z "$BUNDLE" ]] || BUNDLE="$(cd "$BUNDLE" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
rm -f "$OUT/check.log" "$OUT/install.log"  # an earlier run's log is not this run's
cd "$REPO" || die "cannot enter $REPO"

# Wheels only where they will be used (with CUDA): a CPU machine is refused by the preflight, or,
# with --dry-run, checks the folder's wheels by name for every supported Python instead.
if [[ -n "$BUNDLE" && -d "$BUNDLE/wheels" ]]; then
  shopt -s nullglob
  wheels=("$BUNDLE"/wheels/*.whl)
  shopt -u nullglob
  if [[ ${#wheels[@]} -gt 0 ]] && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    # The distributions in the folder by name; pip picks each one's wheel for this Python (no network).
    names=$(for w in "${wheels[@]}"; do basename "$w" | cut -d- -f1; done | sort -u)
    SITE="${MG_SITE:-/tmp/megatron_grow_site}"
    # shellcheck disable=SC2086
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
         --find-links "$BUNDLE/wheels" $names > "$OUT/install.log" 2>&1; then
      echo "[gpu-check] installed ${names//$'\n'/ } from $BUNDLE/wheels into $SITE" | tee -a "$OUT/check.log"
    else
      echo "[gpu-check] wheel install FAILED (see $OUT/install.log); going on with what the image has" \
        | tee -a "$OUT/check.log"
    fi
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH#"$REPO"}"
  fi
fi

# Both streams into check.log; stderr stays stderr (a refusal is one line there).
"$PY" benchmarks/gpu_bench.py --out "$OUT" ${BUNDLE:+--bundle "$BUNDLE"} "${BENCH_ARGS[@]}" \
  2> >(tee -a "$OUT/check.log" >&2) | tee -a "$OUT/check.log"
status="${PIPESTATUS[0]}"
wait  # the stderr tee
exit "$status"
