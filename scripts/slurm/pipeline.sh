#!/usr/bin/env bash
# Submit the paper's 17B -> 35B -> 70B chain (arXiv 2510.08008, docs/paper.md §5) as five
# dependent SLURM jobs; each starts only after the previous one finished with exit 0
# (a preempted training job requeues itself and keeps its job id, so the chain waits for it):
#
#   1 train-17b   train.sbatch  configs/recipes/17b_base.yaml            -> $MG_CKPT_ROOT/17b_base
#   2 grow-depth  grow.sbatch   configs/recipes/17b_to_35b_depth.yaml    17b_base -> 35b
#   3 train-35b   train.sbatch  configs/recipes/17b_to_35b_depth.yaml    resumes 35b (+300B tokens)
#   4 grow-width  grow.sbatch   configs/recipes/35b_to_70b_width.yaml    35b -> 70b
#   5 train-70b   train.sbatch  configs/recipes/35b_to_70b_width.yaml    resumes 70b (+100B tokens)
#
#   scripts/slurm/pipeline.sh [--dry-run] [--start-at STAGE] [--stop-after STAGE] [--after JOBID]
#
# --dry-run prints the sbatch commands (job ids shown as DRYRUN1..DRYRUN5) and submits
# nothing. --start-at skips the stages before STAGE (e.g. grow-depth when the 17B already
# exists); --stop-after submits no stage after STAGE (e.g. train-35b); --after makes the first
# submitted job wait for JOBID. Prints one "submitted STAGE as job ID" line per job on stderr.
# Settings: scripts/slurm/cluster.env or the environment (see cluster.env.example); required:
# MG_ACCOUNT (may be empty), MG_PARTITION, MG_CONTAINER_IMAGE (may be empty), MG_DATA_PATH,
# MG_TOKENIZER_MODEL, MG_CKPT_ROOT. Optional: MG_RECIPE_BASE, MG_RECIPE_DEPTH, MG_RECIPE_WIDTH
# (the three recipes; default the paper's), MG_GROW_LAYOUT (layout flags of the grow jobs),
# MG_SBATCH_ARGS (extra sbatch options for every job, e.g. "--gpus-per-node=0" on a machine
# without GPUs), MG_LOG_DIR (job logs; default logs/ in the repository), MG_NODES_*, MG_*_TIME.
# Training jobs pass both --grow-from SOURCE and checkpoint.load=DEST: the trainer resumes
# from checkpoint.load when it holds a checkpoint (here: the one the grow job wrote) and
# grows from SOURCE only when it does not (docs/launching.md, "trainer contract").
set -euo pipefail

MG_REPO="${MG_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
export MG_REPO
# shellcheck source=scripts/slurm/lib.sh
source "$MG_REPO/scripts/slurm/lib.sh"

STAGES=(train-17b grow-depth train-35b grow-width train-70b)
dry_run=0 start_at=train-17b stop_after=train-70b after=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --start-at) start_at="${2:?--start-at needs a stage}"; shift 2 ;;
        --stop-after) stop_after="${2:?--stop-after needs a stage}"; shift 2 ;;
        --after) after="${2:?--after needs a job id}"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) mg_die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ " ${STAGES[*]} " == *" $start_at "* ]] || mg_die "--start-at must be one of: ${STAGES[*]}"
[[ " ${STAGES[*]} " == *" $stop_after "* ]] || mg_die "--stop-after must be one of: ${STAGES[*]}"

mg_load_cluster_env
mg_require_set MG_ACCOUNT MG_CONTAINER_IMAGE
mg_require MG_PARTITION MG_DATA_PATH MG_TOKENIZER_MODEL MG_CKPT_ROOT

R="$MG_CKPT_ROOT"
BASE_RECIPE="${MG_RECIPE_BASE:-configs/recipes/17b_base.yaml}"
DEPTH_RECIPE="${MG_RECIPE_DEPTH:-configs/recipes/17b_to_35b_depth.yaml}"
WIDTH_RECIPE="${MG_RECIPE_WIDTH:-configs/recipes/35b_to_70b_width.yaml}"
# Growth runs on MG_GROW_NODES (default 1) with pipeline parallelism 1 and EP 8: the weights-
# only grown model fits (35B: ~5.6B parameters per GPU, 70B: ~9.9B), and torch_dist
# checkpoints reshard when the training job loads them with the recipe's PP 2 / PP 4.
read -r -a GROW_LAYOUT <<< "${MG_GROW_LAYOUT:---pipeline-model-parallel-size 1 --expert-model-parallel-size 8}"
read -r -a extra_sbatch <<< "${MG_SBATCH_ARGS:-}"

common=(--parsable --chdir="$MG_REPO" --partition="$MG_PARTITION")
[[ -n "$MG_ACCOUNT" ]] && common+=(--account="$MG_ACCOUNT")
[[ -n "${MG_LOG_DIR:-}" ]] && common+=(--output="$MG_LOG_DIR/%x-%j.out")
common+=("${extra_sbatch[@]}")

train_job() {  # name nodes recipe ckpt_dir [trainer args...]
    local name="$1" nodes="$2" recipe="$3" dir="$4"
    shift 4
    submit_cmd=(sbatch "${common[@]}" --job-name="mg-$name" --nodes="$nodes"
                --time="${MG_TRAIN_TIME:-24:00:00}" "${dependency[@]}"
                scripts/slurm/train.sbatch --config "$recipe" "$@"
                "checkpoint.save=$dir" "checkpoint.load=$dir" "logging.tensorboard_dir=$dir/tensorboard")
}

grow_job() {  # name recipe src dst
    local name="$1" recipe="$2" src="$3" dst="$4"
    submit_cmd=(sbatch "${common[@]}" --job-name="mg-$name" --nodes="${MG_GROW_NODES:-1}"
                --time="${MG_GROW_TIME:-04:00:00}" "${dependency[@]}"
                scripts/slurm/grow.sbatch --load "$src" --save "$dst" --recipe "$recipe"
                "${GROW_LAYOUT[@]}")
}

[[ "$dry_run" == 1 ]] || mkdir -p "${MG_LOG_DIR:-$MG_REPO/logs}"
previous="$after"
started=0
n=0
for stage in "${STAGES[@]}"; do
    n=$((n + 1))
    [[ "$stage" == "$start_at" ]] && started=1
    [[ "$started" == 1 ]] || continue
    dependency=()
    [[ -n "$previous" ]] && dependency=(--dependency="afterok:$previous")
    case "$stage" in
        train-17b)  train_job 17b-base "${MG_NODES_17B:-8}" "$BASE_RECIPE" "$R/17b_base" ;;
        grow-depth) grow_job grow-35b "$DEPTH_RECIPE" "$R/17b_base" "$R/35b" ;;
        train-35b)  train_job 35b "${MG_NODES_35B:-8}" "$DEPTH_RECIPE" "$R/35b" --grow-from "$R/17b_base" ;;
        grow-width) grow_job grow-70b "$WIDTH_RECIPE" "$R/35b" "$R/70b" ;;
        train-70b)  train_job 70b "${MG_NODES_70B:-8}" "$WIDTH_RECIPE" "$R/70b" --grow-from "$R/35b" ;;
    esac
    if [[ "$dry_run" == 1 ]]; then
        mg_print_cmd "${submit_cmd[@]}"
        previous="DRYRUN$n"
    else
        previous="$("${submit_cmd[@]}")"
        previous="${previous%%;*}"   # --parsable prints "id" or "id;cluster"
        echo "submitted $stage as job $previous" >&2
    fi
    if [[ "$stage" == "$stop_after" ]]; then
        break
    fi
done
