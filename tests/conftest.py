"""Test set-up shared by every test: the pack importable as the package ``lora_foundry``.

The pack is loaded by ComfyUI from a folder whose name the user chooses, so the code uses
relative imports only. Tests register the repository as ``lora_foundry`` without running
its ``__init__.py`` (which imports ComfyUI), so ``lora_foundry.lora_core`` imports alone.
"""

import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if "lora_foundry" not in sys.modules:
    _pkg = types.ModuleType("lora_foundry")
    _pkg.__path__ = [str(REPO)]
    _pkg.__file__ = str(REPO / "__init__.py")
    sys.modules["lora_foundry"] = _pkg

# ComfyUI (installed by scripts/setup_runtime.sh, or the user's own via COMFYUI_PATH) and the
# dev scripts (model factory, server driver) are importable for the tests that need them;
# tests/unit never imports them.
import os  # noqa: E402

COMFY_DIR = Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()
for _p in (str(REPO / "scripts"), str(COMFY_DIR)):
    if _p not in sys.path:
        sys.path.append(_p)


def pytest_report_header(config):
    # Which ComfyUI this run tests: scripts/run_tests.sh runs the suite on more than one.
    from comfy_server import comfy_version

    return f"ComfyUI {comfy_version(COMFY_DIR)} at {COMFY_DIR}"
