#!/usr/bin/env bash
# The GPU checks of the SPMD rollout (issue 16), in one command, on a machine with CUDA:
#   bash scripts/gpu_checks.sh
# 1. the tiny main job on the accelerator: NCCL, bf16, one SPMD vLLM engine per
#    rollout-TP block of GPUs that sleeps during the update and wakes for generation,
#    on as many ranks as there are GPUs (up to 4; RTP=2 when there are >= 2);
# 2. tests/gpu (Transformer Engine bf16/FP8 against the local spec);
# 3. the weight-sync bench (single-engine rows + the SPMD row).
# Prints RESULT lines; exits non-zero on the first failure.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py=.venv/bin/python
ngpu=$(nvidia-smi -L | wc -l)
(( ngpu >= 1 )) || { echo "gpu_checks: no GPU visible" >&2; exit 1; }
nproc=$(( ngpu >= 4 ? 4 : (ngpu >= 2 ? 2 : 1) ))
rtp=$(( nproc >= 2 ? 2 : 1 ))
tp=$(( nproc >= 2 ? 2 : 1 ))
out=$(mktemp -d)
.venv/bin/torchrun --nproc-per-node "$nproc" -m sophiavl_mcore.train \
    --config examples/configs/tiny_cpu.yaml output_dir="$out/main" parallel.backend=nccl \
    parallel.tp="$tp" rollout.tensor_parallel_size="$rtp" rollout.dtype=bfloat16 \
    rollout.enforce_eager=false rollout.gpu_memory_utilization=0.3 model.dtype=bfloat16 \
    train.total_steps=4 warm_start.steps=10 train.val_every=0 export_hf=false
"$py" - "$out/main/metrics.jsonl" <<'PY'
import json, sys
steps = [json.loads(x) for x in open(sys.argv[1])]
worst = max(s["train/logprob_mismatch_max"] for s in steps)
print(f"RESULT gpu_main_job steps={len(steps)} engines={steps[-1]['rollout/engines']:.0f} "
      f"logprob_diff_max={worst:.3g} step_s={steps[-1]['timing/step_s']:.2f}")
PY
"$py" -m pytest -p no:cacheprovider -q tests/gpu
"$py" bench/bench_weight_sync.py
