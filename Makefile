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

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .
