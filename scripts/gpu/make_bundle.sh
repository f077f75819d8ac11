#!/usr/bin/env bash
# Make the folder the GPU check carries (at most 64 MiB), on a CPU machine with network:
# wheels/ (megatron-core 0.16.1 and sentencepiece for every Python setup.py admits: the image's is
# picked at run time) and data/ (tokenizer + indexed dataset of the shipped corpus, vocabulary 8192).
#
#   scripts/gpu/make_bundle.sh BUNDLE [--dry-run]    # --dry-run: a small corpus slice, vocabulary 512
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[[ $# -ge 1 ]] || { echo "make_bundle.sh: BUNDLE folder required" >&2; exit 2; }
BUNDLE="$1"; shift
PY="${PYTHON:-python3}"
mkdir -p "$BUNDLE/wheels"
for py in 3.10 3.11 3.12; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$BUNDLE/wheels" "megatron-core==0.16.1" sentencepiece
done
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$REPO/benchmarks/gpu_bench.py" --prepare "$BUNDLE" "$@"
du -sh "$BUNDLE"
