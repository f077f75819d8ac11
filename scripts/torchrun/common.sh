# shellcheck shell=bash
# Shared by scripts/torchrun/*.sh: GPU count (and, from ../slurm/lib.sh, command printing).
# Sourced, never run.

# Processes per node: $NPROC, else the number of GPUs `nvidia-smi -L` lists, else 1.
mg_nproc() {
    if [[ -n "${NPROC:-}" ]]; then
        echo "$NPROC"
        return
    fi
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    if [[ "$n" =~ ^[0-9]+$ && "$n" -gt 0 ]]; then echo "$n"; else echo 1; fi
}

# mg_print_cmd (one command on one line, quoted only where needed) is shared with the SLURM
# launchers; lib.sh only defines functions, so sourcing it has no side effects.
# shellcheck source=scripts/slurm/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../slurm" && pwd)/lib.sh"
