# Two commands: `make demo` (set up, start ComfyUI, run every workflow) and `make test`.
PORT ?= 8188
PY := .venv/bin/python

.PHONY: demo test setup lint format bench

setup:
	bash scripts/setup_runtime.sh

demo: setup
	$(PY) scripts/demo.py --port $(PORT) $(if $(STOP),--stop,)

test: setup
	bash scripts/run_tests.sh

# Every benchmark with its default settings, one after another (about 15 minutes on 2 cores);
# run on a quiet machine: other jobs distort the timings.
bench: setup
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .
