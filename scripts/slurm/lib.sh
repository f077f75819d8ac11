# shellcheck shell=bash
# Shared by pipeline.sh, train.sbatch and grow.sbatch: cluster settings, required-variable
# checks, command printing, and the exit-code contract. Sourced, never run.
#
# Exit-code contract with `megatron-grow train` (docs/launching.md):
#   0 = reached training.train_iters; 3 = preempted (SIGUSR1/SIGTERM), checkpoint saved,
#   resubmit to continue; anything else = failure.

export MG_EXIT_PREEMPTED=3

mg_die() {
    echo "error: $*" >&2
    exit 2
}

# Source the cluster file (MG_CLUSTER_ENV, default scripts/slurm/cluster.env) if it exists.
# Variables already exported in the environment win over the file.
mg_load_cluster_env() {
    local file="${MG_CLUSTER_ENV:-$MG_REPO/scripts/slurm/cluster.env}"
    if [[ -n "${MG_CLUSTER_ENV:-}" && ! -f "$file" ]]; then
        mg_die "MG_CLUSTER_ENV=$MG_CLUSTER_ENV does not exist"
    fi
    [[ -f "$file" ]] || return 0
    local saved
    saved="$(export -p | grep -E '^declare -x MG_[A-Za-z0-9_]+=' || true)"
    # shellcheck source=/dev/null
    source "$file"
    # declare inside a function is local unless -g.
    eval "${saved//declare -x /declare -gx }"
}

# mg_require_set VAR...: each must be set (an empty value is allowed and means "none").
mg_require_set() {
    local var
    for var in "$@"; do
        if [[ -z "${!var+x}" ]]; then
            mg_die "$var is not set. Set it in the environment or in scripts/slurm/cluster.env" \
                "(copy scripts/slurm/cluster.env.example); an empty value means 'none'."
        fi
    done
}

# mg_require VAR...: each must be set and non-empty.
mg_require() {
    local var
    for var in "$@"; do
        if [[ -z "${!var:-}" ]]; then
            mg_die "$var is not set (or empty). Set it in the environment or in scripts/slurm/cluster.env" \
                "(copy scripts/slurm/cluster.env.example)."
        fi
    done
}

# Print one command on one line, each argument quoted for a POSIX shell only when it needs it
# (single quotes), so the line can be pasted into a shell or split with Python's shlex.
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

# MG_DATA_PATH ("prefix" or Megatron style "w1 prefix1 w2 prefix2 ...") -> a recipe override.
mg_data_overrides() {
    if [[ -n "${MG_DATA_PATH:-}" ]]; then
        local -a parts
        read -r -a parts <<< "$MG_DATA_PATH"
        local joined="" part
        for part in "${parts[@]}"; do
            joined+="${joined:+, }$part"
        done
        echo "data.data_path=[$joined]"
    fi
    if [[ -n "${MG_TOKENIZER_MODEL:-}" ]]; then
        echo "data.tokenizer_model=$MG_TOKENIZER_MODEL"
    fi
}

# The rendezvous host: MASTER_ADDR if given, else the address of the first node of the
# allocation. A SLURM node name need not resolve (NodeName=gpu01 NodeAddr=10.0.0.1), so the
# node's NodeAddr is used; it equals the name when slurm.conf gives no NodeAddr.
mg_master_addr() {
    if [[ -n "${MASTER_ADDR:-}" ]]; then
        echo "$MASTER_ADDR"
    elif command -v scontrol >/dev/null 2>&1 && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
        local first addr
        first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
        addr="$(scontrol show node -o "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n1 || true)"
        addr="${addr#NodeAddr=}"
        echo "${addr:-$first}"
    elif [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "FIRST_HOST_OF_SLURM_JOB_NODELIST"
    else
        mg_die "cannot find the rendezvous host: scontrol is missing or SLURM_JOB_NODELIST is empty; set MASTER_ADDR"
    fi
}

# srun options for the container (pyxis/enroot); nothing when MG_CONTAINER_IMAGE is empty.
mg_container_args() {
    if [[ -n "${MG_CONTAINER_IMAGE:-}" ]]; then
        local mounts="$MG_REPO:$MG_REPO"
        [[ -n "${MG_CONTAINER_MOUNTS:-}" ]] && mounts+=",$MG_CONTAINER_MOUNTS"
        echo "--container-image=$MG_CONTAINER_IMAGE"
        echo "--container-mounts=$mounts"
        echo "--container-workdir=$MG_REPO"
    fi
}

# GPUs per node for --nproc-per-node.
mg_gpus_per_node() {
    echo "${MG_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
}
