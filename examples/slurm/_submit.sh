#!/usr/bin/env bash
# Shared by the per-recipe wrappers (sourced, not run): `submit_recipe RECIPE NAME
# [sbatch options…] -- [config overrides…]` submits examples/slurm/sophiavl.sbatch.
#
# Caller-side knobs (environment): SOPHIAVL_ROOT (default: this repository), LOG_ROOT
# (default: $SOPHIAVL_ROOT/logs/slurm; Slurm's own output goes to $LOG_ROOT/slurm-<id>.out,
# everything else to $LOG_ROOT/<id>/), SBATCH_EXTRA_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=abc --time=2-00:00:00"; later options win), plus every
# parameter of sophiavl.sbatch (OUTPUT_DIR, OUTPUT_ROOT, PYTHON, OVERRIDES, …) and
# sbatch's own SBATCH_* variables (SBATCH_PARTITION, SBATCH_ACCOUNT, …).
set -euo pipefail

submit_recipe() {
  local recipe="$1" name="$2"
  shift 2
  local sbatch_opts=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do sbatch_opts+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift  # the "--"
  local here
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  export SOPHIAVL_ROOT="${SOPHIAVL_ROOT:-$(cd "$here/../.." && pwd)}"
  export RECIPE="$recipe"
  export LOG_ROOT="${LOG_ROOT:-$SOPHIAVL_ROOT/logs/slurm}"
  mkdir -p "$LOG_ROOT"
  local extra=()
  read -r -a extra <<<"${SBATCH_EXTRA_ARGS:-}"
  sbatch --job-name="$name" --chdir="$SOPHIAVL_ROOT" --output="$LOG_ROOT/slurm-%j.out" \
    "${sbatch_opts[@]}" "${extra[@]}" "$here/sophiavl.sbatch" "$@"
}
