# shellcheck shell=bash
# Shared by scripts/torchrun/*.sh: GPU count and command printing. Sourced, never run.

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

# Print one command on one line, quoting (POSIX single quotes) only the arguments that need it.
mg_print_cmd() {
    local out="" arg q="'"
    for arg in "$@"; do
        if [[ -n "$arg" && "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+="$arg "
        else
            out+="$q${arg//$q/$q\\$q$q}$q "
        fi
    done
    echo "${out% }"
}
