#!/usr/bin/env bash
# Qwen2.5-VL-72B Trust-GRPO on 8 nodes × 8 H100 (TP=8 × PP=4 × DP=2, see the recipe).
# Arguments are config overrides, e.g. the two placeholders of the recipe (paths on a
# file system every node sees):
#   examples/slurm/qwen2_5_vl_72b_64xh100.sh model.hf_dir=/shared/Qwen2.5-VL-72B-Instruct \
#     "data.sources=[{path: /shared/sophiavl/train.jsonl}]"
# OUTPUT_ROOT / LOG_ROOT must be shared too (default: under the repository). Site
# settings go in the environment: SBATCH_PARTITION / SBATCH_ACCOUNT, NCCL_* (e.g.
# NCCL_SOCKET_IFNAME, NCCL_IB_HCA), SBATCH_EXTRA_ARGS; TIME_LIMIT (default 2 days).
set -euo pipefail
# shellcheck source=examples/slurm/_submit.sh
source "$(dirname "${BASH_SOURCE[0]}")/_submit.sh"
export NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
submit_recipe examples/configs/qwen2_5_vl_72b_64xh100.yaml sophiavl-72b \
  --nodes="${NODES:-8}" --gpus-per-node="${GPUS_PER_NODE:-8}" \
  --cpus-per-task="${CPUS_PER_TASK:-64}" --exclusive --time="${TIME_LIMIT:-2-00:00:00}" -- "$@"
