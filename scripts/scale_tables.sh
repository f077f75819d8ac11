#!/usr/bin/env bash
# Regenerates docs/scale/*.json: the growth rehearsal (megatron-grow plan on a growth recipe) of the
# paper's two growth steps at their recipes' layouts and at two others. One CPU machine, no GPU;
# each line takes 0.5-5 minutes (every rank of the grow is simulated, docs/scale.md).
#     bash scripts/scale_tables.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/scale
mkdir -p "$out"
plan() { name=$1; shift; echo "[scale] $name" >&2; python -m megatron_grow plan --json "$@" > "$out/$name.json"; }
# 17B -> 35B: the source is the 17B as its recipe trains it (EP 8, PP 1, one node).
src17=(--source-nodes 1 --source-parallel pipeline_model_parallel_size=1)
plan 17b_to_35b_recipe_4nodes --config configs/growth/17b_to_35b.yaml --nodes 4 "${src17[@]}"
plan 17b_to_35b_pp2_2nodes --config configs/growth/17b_to_35b.yaml --nodes 2 "${src17[@]}" \
    parallel.pipeline_model_parallel_size=2
plan 17b_to_35b_recipe_8nodes --config configs/growth/17b_to_35b.yaml --nodes 8 "${src17[@]}"
# 35B -> 70B: the source is the 35B as its recipe trains it (EP 8, PP 4, four nodes).
plan 35b_to_70b_recipe_4nodes --config configs/growth/35b_to_70b.yaml --nodes 4 --source-nodes 4
plan 35b_to_70b_recipe_8nodes --config configs/growth/35b_to_70b.yaml --nodes 8 --source-nodes 4
plan 35b_to_70b_ep16_8nodes --config configs/growth/35b_to_70b.yaml --nodes 8 --source-nodes 4 \
    --source-parallel expert_model_parallel_size=8 parallel.expert_model_parallel_size=16
# The training side: parameters per GPU of every pipeline stage from the real model on meta vs plan's formula.
python -m megatron_grow.analysis.training_memory configs/models/35b.yaml 32 > "$out/training_35b_32gpus.json"
python -m megatron_grow.analysis.training_memory configs/growth/35b_to_70b.yaml 32 > "$out/training_70b_32gpus.json"
