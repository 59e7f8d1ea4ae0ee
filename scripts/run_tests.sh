#!/usr/bin/env bash
# Lint, then the test suite on each ComfyUI the pack is tested on ("legs", installed by
# scripts/setup_runtime.sh), each in its own venv:
#   1. .comfyui (ComfyUI 0.3.75, or COMFYUI_PATH) with .venv: the whole suite. A full run (no
#      arguments) then runs tests/browser twice more against the newest ComfyUI frontend
#      (.frontend-newest), with its classic canvas nodes and with Nodes 2.0.
#   2. .comfyui-newest (ComfyUI 0.12.1) with .venv-newest, on a full run, in the background beside
#      the first leg (output in test-artifacts/second-leg.log): every test that runs the pack in ComfyUI (tests/comfy, tests/server, tests/browser with the frontend that ComfyUI
#      installs), except those marked `first_leg` (tests/conftest.py), which pytest lists as
#      deselected. tests/unit never imports ComfyUI and runs on the first leg. Where set-up had no
#      tarball for this leg, one line says it did not run.
# Extra arguments go to pytest on the first leg only (for iterating). A pass that collects no tests
# fails. LORA_FOUNDRY_SKIP_BROWSER=1 leaves out tests/browser on every leg and says what it left
# out. Every pass runs even after one failed; a summary names each pass's result and time.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
skip_browser=${LORA_FOUNDRY_SKIP_BROWSER:-}
summary=()
failed=0

# run_pass NAME COMMAND...: one pytest run, recorded in the summary.
run_pass() {
  local name=$1 start=$SECONDS rc
  shift
  echo "[test] $name"
  "$@"
  rc=$?
  if [ $rc -eq 5 ]; then echo "[test] no tests were collected: failing" >&2; rc=1; fi
  local took="$(((SECONDS - start) / 60))m $(((SECONDS - start) % 60))s"
  if [ $rc -eq 0 ]; then summary+=("passed  $name ($took)"); else summary+=("FAILED  $name (exit $rc, $took)"); failed=1; fi
}

# comfy_version DIR: the version a ComfyUI tree declares (tests/server/test_runtime_leg.py checks
# that the server a pass starts reports it, so a pass cannot quietly run another tree).
comfy_version() { sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$1/comfyui_version.py" 2>/dev/null; }

echo "[test] ruff check"; .venv/bin/ruff check . || exit 1
echo "[test] ruff format --check"; .venv/bin/ruff format --check . || exit 1

no_browser=()
if [ -n "$skip_browser" ]; then
  no_browser=(--ignore=tests/browser)
  count=$(.venv/bin/python -m pytest --collect-only -q tests/browser 2>/dev/null | tail -n 1)
  echo "[test] LORA_FOUNDRY_SKIP_BROWSER=1: tests/browser ($count) left out on every leg, and its passes on the newest frontend"
fi

# The second leg: what runs the pack inside ComfyUI. tests/unit never imports ComfyUI
# (tests/unit/test_unit_tests_stay_comfy_free.py checks) and runs on the first leg with the same
# torch pin; the `first_leg` tests are deselected by tests/conftest.py (LORA_FOUNDRY_LEG=second).
# On a full run it starts now, in the background, and runs beside the first leg and its browser
# passes: each leg has its own ComfyUI tree, venv, temporary folders and server ports, and most tests
# drive tiny models on one thread, so two legs side by side use the machine's two cores. Both legs
# then run torch on one thread each (OMP_NUM_THREADS=1). Its output goes to a log, printed at the end.
second_pid=""
threads=()
if [ $# -eq 0 ] && [ -f .comfyui-newest/.complete ] && [ -x .venv-newest/bin/python ]; then
  second_dir=$(cd .comfyui-newest && pwd -P)
  second=$(comfy_version "$second_dir")
  second_paths=(tests/comfy tests/server)
  [ -n "$skip_browser" ] || second_paths+=(tests/browser)
  mkdir -p test-artifacts
  second_log=test-artifacts/second-leg.log
  echo "[test] ComfyUI ${second:-?} (second leg): pytest ${second_paths[*]} in the background, output in $second_log"
  (
    start=$SECONDS
    env COMFYUI_PATH="$second_dir" LORA_FOUNDRY_EXPECT_COMFYUI="$second" LORA_FOUNDRY_LEG=second OMP_NUM_THREADS=1 \
      .venv-newest/bin/python -m pytest "${second_paths[@]}" > "$second_log" 2>&1
    echo "$? $((SECONDS - start))" > "$second_log.rc"
  ) &
  second_pid=$!
  threads=(OMP_NUM_THREADS=1)
fi

first_dir=${COMFYUI_PATH:-.comfyui}
first=$(comfy_version "$first_dir")
run_pass "ComfyUI ${first:-?} ($first_dir): pytest $*" \
  env LORA_FOUNDRY_EXPECT_COMFYUI="$first" "${threads[@]}" .venv/bin/python -m pytest "${no_browser[@]}" "$@"
[ $# -eq 0 ] || { printf '[test] %s\n' "${summary[@]}"; exit $failed; }

# The newest frontend on the first leg, with its classic canvas nodes and with "Nodes 2.0" (nodes
# drawn by Vue components): users of a newer ComfyUI get a newer frontend than 0.3.75 asks for.
if [ -z "$skip_browser" ]; then
  frontend=.frontend-newest
  if [ -f "$frontend/.complete" ]; then
    version=$(cat "$frontend/.complete")
    root=$(cd "$frontend" && pwd -P)
    for vue in 0 1; do
      run_pass "ComfyUI ${first:-?}, tests/browser on frontend $version$([ $vue = 1 ] && echo ', Nodes 2.0')" \
        env LORA_FOUNDRY_FRONTEND_ROOT="$root" LORA_FOUNDRY_FRONTEND_VERSION="$version" \
        LORA_FOUNDRY_VUE_NODES=$vue LORA_FOUNDRY_EXPECT_COMFYUI="$first" "${threads[@]}" .venv/bin/python -m pytest tests/browser
    done
  else
    echo "[test] no $frontend: run scripts/setup_runtime.sh" >&2
    summary+=("FAILED  tests/browser on the newest frontend: no $frontend")
    failed=1
  fi
fi

# The second leg, started before the first (see above) when this is a full run: wait for it.
if [ -n "$second_pid" ]; then
  echo "[test] waiting for the second leg (ComfyUI ${second:-?}, running since the start)"
  wait "$second_pid"
  echo "[test] the second leg's output ($second_log):"
  cat "$second_log"
  read -r rc took < "$second_log.rc"
  took="$((took / 60))m $((took % 60))s"
  if [ "$rc" -eq 5 ]; then rc=1; fi
  name="ComfyUI ${second:-?} (second leg, beside the first): pytest ${second_paths[*]}, without the first_leg tests"
  if [ "$rc" -eq 0 ]; then summary+=("passed  $name ($took)"); else summary+=("FAILED  $name (exit $rc, $took)"); failed=1; fi
elif [ $# -eq 0 ]; then
  echo "[test] second leg (the newest ComfyUI, from ../shared/runtimes) did not run: set-up found no tarball for it"
  summary+=("not run  second leg (newest ComfyUI): no ../shared/runtimes tarball at set-up")
fi

printf '[test] %s\n' "${summary[@]}"
exit $failed
