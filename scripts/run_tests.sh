#!/usr/bin/env bash
# The README's test command: set up .venv (if needed), lint, then the whole test suite.
# Extra arguments go to pytest, e.g. `scripts/run_tests.sh tests/unit -k rouge`.
# `--fast` (first argument): the fast tier only — tests/unit without the `slow` and `dist`
# markers (scorers, config, kernels against their oracles; no torchrun, no servers, no Slurm).
# SOPHIAVL_FAST_TIER=1 makes that a rule: tests/unit/conftest.py fails a test whose
# subprocess would start torchrun, a vLLM server or Slurm.
set -euo pipefail
fast=0
if [[ "${1:-}" == "--fast" ]]; then
  fast=1
  shift
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
if [[ $fast -eq 1 ]]; then
  .venv/bin/ruff check .
  export SOPHIAVL_FAST_TIER=1
  set +e
  .venv/bin/python -m pytest -p no:cacheprovider -m "not slow and not dist" tests/unit "$@"
  rc=$?
  set -e
  [[ $rc -eq 5 ]] && { echo "run_tests: pytest collected no tests" >&2; exit 1; }
  exit $rc
fi
# tests/slurm brings up a real one-node Slurm; installed here, so it must not skip.
bash scripts/install_slurm.sh
export SOPHIAVL_REQUIRE_SLURM="${SOPHIAVL_REQUIRE_SLURM:-1}"
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest -p no:cacheprovider --durations=20 "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "run_tests: pytest collected no tests" >&2
  exit 1
fi
exit $rc
