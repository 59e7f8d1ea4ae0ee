#!/usr/bin/env bash
# Lint, then the whole test suite (unit, in-process ComfyUI, real server), in the project's venv.
# Extra arguments go to pytest. A run that collects no tests fails. A full run (no arguments)
# then runs tests/browser again against the newest ComfyUI frontend (.frontend-newest), with its
# classic nodes and with Nodes 2.0.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=.venv/bin
echo "[test] ruff check"; "$venv/ruff" check . || exit 1
echo "[test] ruff format --check"; "$venv/ruff" format --check . || exit 1
echo "[test] pytest"
"$venv/python" -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "[test] no tests were collected: failing" >&2; exit 1; fi
[ $rc -eq 0 ] || exit $rc
# A full run (no arguments) also runs the browser tests against the newest ComfyUI frontend,
# with its classic canvas nodes and with "Nodes 2.0" (nodes drawn by Vue components).
if [ $# -eq 0 ]; then
  frontend=.frontend-newest
  [ -f "$frontend/.complete" ] || { echo "[test] no $frontend: run scripts/setup_runtime.sh" >&2; exit 1; }
  version=$(cat "$frontend/.complete")
  root=$(cd "$frontend" && pwd -P)
  for vue in 0 1; do
    echo "[test] browser tests again, on ComfyUI frontend $version$([ $vue = 1 ] && echo ', Nodes 2.0')"
    LORA_FOUNDRY_FRONTEND_ROOT=$root LORA_FOUNDRY_FRONTEND_VERSION=$version LORA_FOUNDRY_VUE_NODES=$vue \
      "$venv/python" -m pytest tests/browser || exit 1
  done
fi
exit 0
