#!/usr/bin/env bash
# Set-up for bench/bench_step.py: installs requirements/bench.txt (TRL and the few packages it
# needs beyond the training stack) into bench/.deps, leaving the project's .venv untouched.
# bench_step.py puts bench/.deps on TRL's PYTHONPATH.  Usage: bench/setup_bench.sh [python]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${1:-$root/.venv/bin/python}"
"$py" -m pip install --quiet --no-deps --target "$root/bench/.deps" -r "$root/requirements/bench.txt"
PYTHONPATH="$root/bench/.deps" "$py" -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)"
