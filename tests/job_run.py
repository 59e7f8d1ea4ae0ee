"""Headless training-job runs shared by the job tests: scripts/train_job.py in a subprocess on the
demo SD1.5 checkpoint, with ComfyUI's folders under the tests' temporary base."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()
DEMO = "lora_foundry_demo_sd15.safetensors"
SETTINGS = dict(steps=2, lr=1e-4)  # few steps at 64x64; Train LoRA's default learning rate


def script_args(job, base) -> list[str]:
    return [str(REPO / "scripts" / "train_job.py"), str(job), "--comfyui", str(COMFY_DIR),
            "--base-directory", str(base), "--cpu"]  # fmt: skip


def run_headless(job, base, timeout: float = 900) -> subprocess.CompletedProcess:
    """scripts/train_job.py on ``job`` with ComfyUI's folders under ``base``, one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *script_args(job, base)], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip
