"""lora_core stays a plain library: importing its modules pulls in no ComfyUI module."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULES = ["adapters", "lorafile", "formats", "keymap", "detect", "metadata", "block_weights", "te_names"]
# Registers the repo as package "lora_foundry" without running its __init__, as tests/conftest.py
# does, with no ComfyUI directory on sys.path. One interpreter for all modules: torch loads once.
SCRIPT = """
import importlib, json, sys, types
sys.path = [p for p in sys.path if "comfyui" not in p.lower()]
pkg = types.ModuleType("lora_foundry")
pkg.__path__ = [{repo!r}]
sys.modules["lora_foundry"] = pkg
found = {{}}
for name in {modules!r}:
    importlib.import_module("lora_foundry.lora_core." + name)
    found[name] = sorted(m for m in sys.modules
                         if m.split(".")[0] in ("comfy", "comfy_extras", "folder_paths", "server", "nodes"))
print(json.dumps(found))
"""


def test_modules_import_without_comfy():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(repo=str(REPO), modules=MODULES)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert set(found) == set(MODULES)
    assert {name: mods for name, mods in found.items() if mods} == {}
