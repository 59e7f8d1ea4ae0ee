#!/usr/bin/env bash
# Installs what the browser tests need: Debian's chromium (apt) and Playwright (PyPI) in the
# project's venv. Idempotent: installs only what is missing. Playwright never downloads a
# browser here; the tests start /usr/bin/chromium (or $CHROMIUM) through executable_path.
#
#   CHROMIUM=/path/to/chromium   use this browser instead of installing Debian's chromium
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
vpy="$repo/.venv/bin/python"
chromium=${CHROMIUM:-/usr/bin/chromium}
log() { printf '[setup-browser] %s\n' "$*"; }

[ -x "$vpy" ] || { echo "no venv at $repo/.venv: run scripts/setup_runtime.sh first" >&2; exit 1; }

if [ ! -x "$chromium" ]; then
  [ -z "${CHROMIUM:-}" ] || { echo "CHROMIUM=$CHROMIUM is not an executable" >&2; exit 1; }
  command -v apt-get >/dev/null || { echo "no apt-get: install chromium yourself and set CHROMIUM" >&2; exit 1; }
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing chromium (apt)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
log "browser: $("$chromium" --version 2>/dev/null || echo "$chromium")"

if ! "$vpy" -c "import playwright" 2>/dev/null; then
  log "installing playwright (PyPI, no browser download)"
  spec=$(grep -iE '^\s*playwright' "$repo/requirements-dev.txt" | sed 's/#.*//' | tr -d ' ' || true)
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$vpy" -m pip install --quiet --disable-pip-version-check "${spec:-playwright}"
fi
log "ready: playwright $("$vpy" -c 'from importlib.metadata import version; print(version("playwright"))')"
