#!/usr/bin/env bash
# The GPU check in one call: install the carried wheels, run the GPU test tier, then measure
# (benchmarks/gpu_bench.py: paper-shaped small MoE tokens/s, TFLOP/s and MFU; the same shape in
# transformers; growth of the trained checkpoint on the GPU and its resume; torch.profiler).
# Everything lands under --out: check.log, install.log, env.txt, gpu_tests.log/.xml,
# bench.log, summary.json, summary.md, profile.txt, work/ (data and checkpoints).
#
#   scripts/gpu/check.sh --out DIR [--wheels DIR] [--dry-run] [--skip-tests] [--skip-bench]
#                        [--no-sequential] [--tests-timeout S]
#
# --dry-run runs the same steps on tiny shapes (CPU is fine); the GPU tests then skip with
# their reasons. Exit code: 0 all ran, 1 a step failed (the others still ran), 2 bad arguments.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="" WHEELS="" DRY_RUN=0 TESTS=1 BENCH=1 TESTS_TIMEOUT=270
BENCH_ARGS=()
usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "check.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) [[ $# -ge 2 ]] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
    --wheels) [[ $# -ge 2 ]] || die "--wheels needs a folder"; WHEELS="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --skip-tests) TESTS=0; shift ;;
    --skip-bench) BENCH=0; shift ;;
    --no-sequential) BENCH_ARGS+=(--no-sequential); shift ;;
    --tests-timeout) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "--tests-timeout needs whole seconds"
                     TESTS_TIMEOUT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$OUT" ]] || die "--out DIR is required"
[[ -z "$WHEELS" || -d "$WHEELS" ]] || die "--wheels $WHEELS is not a folder"
mkdir -p "$OUT" || die "cannot create $OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
FAILED=()
START=$SECONDS
log() { echo "[gpu-check $(( SECONDS - START ))s] $*" | tee -a "$OUT/check.log"; }
step() {  # step NAME LOGFILE CMD...: run, log the outcome, keep going on failure
  local name="$1" logfile="$2"; shift 2
  log "$name ..."
  if "$@" > "$logfile" 2>&1; then log "$name: ok"; else log "$name: FAILED (exit $?, see $logfile)"; FAILED+=("$name"); fi
}
cd "$REPO" || die "cannot enter $REPO"

if [[ -n "$WHEELS" ]]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if [[ ${#wheels[@]} -eq 0 ]]; then
    log "no .whl files in $WHEELS: nothing to install"
  else
    # Into a folder of our own on the path: the image's environment may be read-only, and
    # --no-deps keeps pip from looking for anything the image already has.
    SITE="${MG_SITE:-/tmp/megatron_grow_site}"
    step "install ${#wheels[@]} wheels from $WHEELS (no network) into $SITE" "$OUT/install.log" \
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}"
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH#"$REPO"}"
  fi
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  command -v nvidia-smi > /dev/null && nvidia-smi
  "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("devices", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for name in ("megatron.core", "transformers", "sentencepiece", "transformer_engine"):
    try:
        module = __import__(name, fromlist=["__version__"])
        print(name, getattr(module, "__version__", "?"))
    except Exception as e:
        print(name, "not importable:", type(e).__name__)
PY
} > "$OUT/env.txt" 2>&1
log "environment: $(grep -m1 '^python' "$OUT/env.txt" || echo unknown)"

if [[ $TESTS -eq 1 ]]; then
  step "GPU test tier (pytest -m gpu, at most ${TESTS_TIMEOUT}s)" "$OUT/gpu_tests.log" \
    timeout "$TESTS_TIMEOUT" "$PY" -m pytest -q -rs -m gpu tests/functional/test_gpu.py -p no:cacheprovider \
    --junitxml "$OUT/gpu_tests.xml"
  log "tests: $(grep -E '^[0-9]+ (passed|failed|skipped)|^=+ .* in [0-9.]+s' "$OUT/gpu_tests.log" | tail -1)"
fi

if [[ $BENCH -eq 1 ]]; then
  [[ $DRY_RUN -eq 1 ]] && BENCH_ARGS+=(--dry-run)
  step "benchmark (benchmarks/gpu_bench.py ${BENCH_ARGS[*]:-})" "$OUT/bench.log" \
    "$PY" benchmarks/gpu_bench.py --out "$OUT" "${BENCH_ARGS[@]}"
  [[ -f "$OUT/summary.md" ]] && tee -a "$OUT/check.log" < "$OUT/summary.md"
fi

if [[ ${#FAILED[@]} -gt 0 ]]; then
  log "done in $(( SECONDS - START ))s; FAILED: ${FAILED[*]}"
  exit 1
fi
log "done in $(( SECONDS - START ))s; every step ran; results in $OUT"
