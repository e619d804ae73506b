.PHONY: setup main test lint bench

setup:
	bash scripts/setup_env.sh

main:
	bash scripts/main_job.sh

test:
	bash scripts/run_tests.sh

lint:
	.venv/bin/ruff check .

# Every bench runs its baseline and ours in one process and ends with one RESULT line.
bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; .venv/bin/python $$b || exit 1; done
