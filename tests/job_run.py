"""Headless training-job runs shared by the job tests: scripts/train_job.py in a subprocess on a
compact SD1.5 checkpoint, with ComfyUI's folders under the tests' temporary base."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from te_peer import CACHE

REPO = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()
DEMO = "lora_foundry_demo_sd15.safetensors"
# The job tests' checkpoint: SD1.5 to ComfyUI's detection, with a one-level UNet (26 M parameters)
# and the standard CLIP-L and VAE (make_demo_models.compact_unet_config); 465 MB written once into
# the tests' cache (LORA_FOUNDRY_CACHE, default ~/.cache/lora-foundry) and linked where a test needs it.
COMPACT = "lora_foundry_compact_sd15.safetensors"
SETTINGS = dict(steps=2, lr=1e-4)  # few steps at 64x64; Train LoRA's default learning rate


def script_args(job, base) -> list[str]:
    return [str(REPO / "scripts" / "train_job.py"), str(job), "--comfyui", str(COMFY_DIR),
            "--base-directory", str(base), "--cpu"]  # fmt: skip


def run_headless(job, base, timeout: float = 900) -> subprocess.CompletedProcess:
    """scripts/train_job.py on ``job`` with ComfyUI's folders under ``base``, one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *script_args(job, base)], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def compact_checkpoint() -> Path:
    """The compact SD1.5 checkpoint in the tests' cache, written (about 10 s) when missing."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is first imported
    import make_demo_models

    path = CACHE / "test-models" / f"v1-{COMPACT}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "compact.lock", "w") as lock:  # the two legs of run_tests.sh run side by side
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():  # written to a temporary name, then renamed
            make_demo_models.write_checkpoint(
                path, seed=7, unet_config=make_demo_models.compact_unet_config()
            )
    return path


def link_compact(models: Path) -> str:
    """Links the compact checkpoint into ``models``/checkpoints; returns its name there."""
    link = models / "checkpoints" / COMPACT
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(compact_checkpoint())
    return COMPACT
