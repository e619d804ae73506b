#!/usr/bin/env bash
# The README's test command: set up .venv (if needed), lint, then the whole test suite.
# Extra arguments go to pytest, e.g. `scripts/run_tests.sh tests/unit -k rouge`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
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
