# Two commands: `make demo` (set up, start ComfyUI, run every workflow) and `make test`.
PORT ?= 8188
PY := .venv/bin/python

.PHONY: demo test setup lint format bench docs-images

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

# The pictures in README.md and docs/ (docs/images/), made by the browser tests on the ComfyUI users
# run today (the second leg, with its own frontend) where set-up installed it, else on the first.
docs-images: setup
	if [ -x .venv-newest/bin/python ]; then \
	  LORA_FOUNDRY_DOCS_IMAGES=1 COMFYUI_PATH=$$(cd .comfyui-newest && pwd -P) .venv-newest/bin/python -m pytest tests/browser; \
	else LORA_FOUNDRY_DOCS_IMAGES=1 $(PY) -m pytest tests/browser; fi

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .
