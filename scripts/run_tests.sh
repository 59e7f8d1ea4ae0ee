#!/usr/bin/env bash
# Lint, then the test suite on each ComfyUI the pack is tested on ("legs", installed by
# scripts/setup_runtime.sh), each in its own venv:
#   1. .comfyui (ComfyUI 0.3.75, or COMFYUI_PATH) with .venv: the whole suite. A full run (no
#      arguments) also runs tests/browser twice more against the newest ComfyUI frontend
#      (.frontend-newest), with its classic canvas nodes and with Nodes 2.0.
#   2. .comfyui-newest (ComfyUI 0.12.1) with .venv-newest, on a full run: every test that runs the
#      pack in ComfyUI (tests/comfy, tests/server, tests/browser with the frontend that ComfyUI
#      installs), except those marked `first_leg` (tests/conftest.py), which pytest lists as
#      deselected. tests/unit never imports ComfyUI and runs on the first leg. Where set-up had no
#      tarball for this leg, one line says it did not run.
# A full run has two lanes side by side (see below): the first leg, and in the background the second
# leg, the newest-frontend passes and the first leg's unit and benchmark-script tests (their output
# in test-artifacts/lane2-*.log, printed at the end).
# Extra arguments go to pytest on the first leg only (for iterating). A pass that collects no tests
# fails. LORA_FOUNDRY_SKIP_BROWSER=1 leaves out tests/browser on every leg and says what it left
# out. Every pass runs even after one failed; a summary names each pass's result and time.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
skip_browser=${LORA_FOUNDRY_SKIP_BROWSER:-}
summary=()
failed=0

# record NAME EXIT SECONDS: one pytest run's result in the summary (exit 5: no tests collected).
record() {
  local name=$1 rc=$2 took="$(($3 / 60))m $(($3 % 60))s"
  if [ "$rc" -eq 5 ]; then echo "[test] no tests were collected: failing" >&2; rc=1; fi
  if [ "$rc" -eq 0 ]; then summary+=("passed  $name ($took)"); else summary+=("FAILED  $name (exit $rc, $took)"); failed=1; fi
}

# run_pass NAME COMMAND...: one pytest run here, recorded in the summary.
run_pass() {
  local name=$1 start=$SECONDS
  shift
  echo "[test] $name"
  "$@"
  record "$name" $? $((SECONDS - start))
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

# A full run (no arguments) runs in two lanes side by side, one per core: each pass has its own
# ComfyUI server, port, temporary folders and artifacts, and most tests drive tiny models on one
# thread. Both lanes run torch on one thread (OMP_NUM_THREADS=1).
#   lane 1 (here): the first leg.
#   lane 2 (in the background; each pass's output in test-artifacts/lane2-*.log, printed at the
#   end): the second leg, then the first leg's browser tests on the newest frontend, then the first
#   leg's tests/unit and tests/comfy/test_bench_scripts.py (left out of lane 1).
# The second leg runs what runs the pack inside ComfyUI. tests/unit never imports ComfyUI
# (tests/unit/test_unit_tests_stay_comfy_free.py checks) and runs on the first leg with the same
# torch pin; the `first_leg` tests are deselected by tests/conftest.py (LORA_FOUNDRY_LEG=second).
first_dir=${COMFYUI_PATH:-.comfyui}
first=$(comfy_version "$first_dir")
lane2_names=()
lane2_logs=()
lane2_commands=()
threads=()
if [ $# -eq 0 ]; then
  threads=(OMP_NUM_THREADS=1)
  if [ -f .comfyui-newest/.complete ] && [ -x .venv-newest/bin/python ]; then
    second_dir=$(cd .comfyui-newest && pwd -P)
    second=$(comfy_version "$second_dir")
    second_paths=(tests/comfy tests/server)
    [ -n "$skip_browser" ] || second_paths+=(tests/browser)
    lane2_names+=("ComfyUI ${second:-?} (second leg): pytest ${second_paths[*]}, without the first_leg tests")
    lane2_logs+=(test-artifacts/lane2-second-leg.log)
    lane2_commands+=("env COMFYUI_PATH=$(printf %q "$second_dir") LORA_FOUNDRY_EXPECT_COMFYUI=$second LORA_FOUNDRY_LEG=second OMP_NUM_THREADS=1 .venv-newest/bin/python -m pytest ${second_paths[*]}")
  else
    echo "[test] second leg (the newest ComfyUI, from ../shared/runtimes) did not run: set-up found no tarball for it"
    summary+=("not run  second leg (newest ComfyUI): no ../shared/runtimes tarball at set-up")
  fi
  # The newest frontend on the first leg, with its classic canvas nodes and with "Nodes 2.0" (nodes
  # drawn by Vue components): users of a newer ComfyUI get a newer frontend than 0.3.75 asks for.
  if [ -z "$skip_browser" ]; then
    frontend=.frontend-newest
    if [ -f "$frontend/.complete" ]; then
      version=$(cat "$frontend/.complete")
      root=$(cd "$frontend" && pwd -P)
      for vue in 0 1; do
        lane2_names+=("ComfyUI ${first:-?}, tests/browser on frontend $version$([ $vue = 1 ] && echo ', Nodes 2.0')")
        lane2_logs+=("test-artifacts/lane2-frontend-$version-vue$vue.log")
        lane2_commands+=("env LORA_FOUNDRY_FRONTEND_ROOT=$(printf %q "$root") LORA_FOUNDRY_FRONTEND_VERSION=$version LORA_FOUNDRY_VUE_NODES=$vue LORA_FOUNDRY_EXPECT_COMFYUI=$first OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/browser")
      done
    else
      echo "[test] no $frontend: run scripts/setup_runtime.sh" >&2
      summary+=("FAILED  tests/browser on the newest frontend: no $frontend")
      failed=1
    fi
  fi
fi

# The first leg's library tests and benchmark-script tests go to lane 2 as well, which ends first.
if [ $# -eq 0 ] && [ ${#lane2_commands[@]} -gt 0 ]; then
  moved=(tests/unit tests/comfy/test_bench_scripts.py)
  lane2_names+=("ComfyUI ${first:-?} ($first_dir): pytest ${moved[*]}")
  lane2_logs+=(test-artifacts/lane2-first-leg-unit-bench.log)
  lane2_commands+=("env LORA_FOUNDRY_EXPECT_COMFYUI=$first OMP_NUM_THREADS=1 .venv/bin/python -m pytest ${moved[*]}")
  no_browser+=(--ignore=tests/unit --ignore=tests/comfy/test_bench_scripts.py)
fi

lane2_pid=""
if [ ${#lane2_commands[@]} -gt 0 ]; then
  mkdir -p test-artifacts
  rm -f test-artifacts/lane2-*.log test-artifacts/lane2-*.log.rc
  for i in "${!lane2_names[@]}"; do echo "[test] lane 2, in the background: ${lane2_names[$i]} (output in ${lane2_logs[$i]})"; done
  (
    for i in "${!lane2_commands[@]}"; do
      start=$SECONDS
      eval "${lane2_commands[$i]}" > "${lane2_logs[$i]}" 2>&1
      echo "$? $((SECONDS - start))" > "${lane2_logs[$i]}.rc"
    done
  ) &
  lane2_pid=$!
fi

run_pass "ComfyUI ${first:-?} ($first_dir): pytest $*" \
  env LORA_FOUNDRY_EXPECT_COMFYUI="$first" "${threads[@]}" .venv/bin/python -m pytest "${no_browser[@]}" "$@"

if [ -n "$lane2_pid" ]; then
  echo "[test] waiting for lane 2"
  wait "$lane2_pid"
  for i in "${!lane2_names[@]}"; do
    name=${lane2_names[$i]} log=${lane2_logs[$i]}
    echo "[test] $name (lane 2): output of $log"
    cat "$log" 2>/dev/null
    rc=1 took=0
    [ -f "$log.rc" ] && read -r rc took < "$log.rc"
    record "$name" "$rc" "$took"
  done
fi

printf '[test] %s\n' "${summary[@]}"
exit $failed
