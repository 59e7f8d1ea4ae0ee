#!/usr/bin/env bash
# Lint, then the whole test suite (unit, in-process ComfyUI, real server), in the project's venv.
# Extra arguments go to pytest. A run that collects no tests fails.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=.venv/bin
echo "[test] ruff check"; "$venv/ruff" check . || exit 1
echo "[test] ruff format --check"; "$venv/ruff" format --check . || exit 1
echo "[test] pytest"
"$venv/python" -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "[test] no tests were collected: failing" >&2; exit 1; fi
exit $rc
