#!/usr/bin/env bash
# The tiny CPU recipe (README main job) as a Slurm job: one node, 2 training ranks
# (torchrun --nproc-per-node 2 → DP=2 over gloo; parallel.tp=2 for TP=2), no GPU.
# Arguments are config overrides:
#   examples/slurm/tiny_cpu.sh train.total_steps=40
# NODES (default 1) nodes × NPROC_PER_NODE (default 2) ranks: with parallel.tp=2,
# NODES=2 NPROC_PER_NODE=1 is TP=2 across two nodes and NODES=2 NPROC_PER_NODE=2 is
# TP=2 × DP=2. CPUS_PER_TASK (default
# 2) CPUs are allocated to each node's one torchrun task. The recipe serves its TRM on
# 127.0.0.1 of the first node; with NODES > 1 the other node cannot reach it, so grade
# in-process there (rewards.trm.serve=false rewards.thinking.backend=in_process) or point
# rewards.thinking.base_url at a TRM server every node reaches.
set -euo pipefail
# shellcheck source=examples/slurm/_submit.sh
source "$(dirname "${BASH_SOURCE[0]}")/_submit.sh"
export NPROC_PER_NODE="${NPROC_PER_NODE:-2}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
submit_recipe examples/configs/tiny_cpu.yaml sophiavl-tiny-cpu \
  --nodes="${NODES:-1}" --cpus-per-task="${CPUS_PER_TASK:-2}" --time="${TIME_LIMIT:-02:00:00}" -- "$@"
