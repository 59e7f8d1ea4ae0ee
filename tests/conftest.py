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


# scripts/run_tests.sh sets LORA_FOUNDRY_LEG=second on its second leg (the newest ComfyUI). Tests
# marked `first_leg` are deselected there (pytest's summary counts them as deselected, never as
# passed): the long training-convergence proofs, the data-parallel engine and the benchmark scripts.
# What they call in ComfyUI (model code, sampling objects, loaders, headless and launched jobs) the
# shorter tests run on both legs.
def pytest_collection_modifyitems(config, items):
    if os.environ.get("LORA_FOUNDRY_LEG") != "second":
        return
    dropped = [item for item in items if item.get_closest_marker("first_leg")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.get_closest_marker("first_leg")]
