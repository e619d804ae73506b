#!/usr/bin/env bash
# The README's main job: set up .venv (if needed) and run Trust-GRPO training on CPU —
# a tiny random Qwen2.5-VL, data-parallel on 2 gloo processes, vLLM rollouts on every rank, the
# thinking reward from a separate tiny TRM served on localhost (trained once, cached),
# on the synthetic "how many dots?" task (examples/configs/tiny_cpu.yaml). Output goes
# to runs/tiny_cpu (TensorBoard in runs/tiny_cpu/tb, HF export in runs/tiny_cpu/final/hf).
# Extra arguments are config overrides, e.g.
#   bash scripts/main_job.sh rewards.trust_grpo.use_trust=false train.total_steps=40
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/torchrun --nproc-per-node 2 -m sophiavl_mcore.train \
    --config examples/configs/tiny_cpu.yaml "$@"
