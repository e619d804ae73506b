#!/usr/bin/env bash
# The README's main job: set up .venv (if needed) and run the default CPU job.
# Until the GRPO trainer lands this scores the built-in sample batch through the whole
# reward stage (outcome rewards -> Trust-GRPO -> advantages) and prints the tables.
# Extra arguments go to the job, e.g. `scripts/main_job.sh --step 50 rewards.trust_grpo.use_trust=false`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
exec .venv/bin/python -m sophiavl_mcore.rewards.demo "$@"
