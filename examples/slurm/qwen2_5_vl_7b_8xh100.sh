#!/usr/bin/env bash
# Qwen2.5-VL-7B Trust-GRPO on one node of 8 H100 (TP=4 × DP=2, see the recipe). Arguments
# are config overrides, e.g. the two placeholders of the recipe:
#   examples/slurm/qwen2_5_vl_7b_8xh100.sh model.hf_dir=/shared/Qwen2.5-VL-7B-Instruct \
#     "data.sources=[{path: /shared/sophiavl/train.jsonl}]"
# Site settings go in the environment: SBATCH_PARTITION / SBATCH_ACCOUNT, NCCL_* variables,
# SBATCH_EXTRA_ARGS; TIME_LIMIT (default 2 days; the job requeues itself before it).
set -euo pipefail
# shellcheck source=examples/slurm/_submit.sh
source "$(dirname "${BASH_SOURCE[0]}")/_submit.sh"
export NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
submit_recipe examples/configs/qwen2_5_vl_7b_8xh100.yaml sophiavl-7b \
  --nodes=1 --gpus-per-node="${GPUS_PER_NODE:-8}" --cpus-per-task="${CPUS_PER_TASK:-64}" \
  --exclusive --time="${TIME_LIMIT:-2-00:00:00}" -- "$@"
