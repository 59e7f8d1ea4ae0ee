"""lora_core stays a plain library: importing any of its modules pulls in no ComfyUI module.

Every module of the package is found by walking the folder (new ones are covered without editing
this test) and imported in one fresh interpreter whose sys.path holds no ComfyUI directory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFY_MODULES = ("comfy", "comfy_extras", "comfy_api", "folder_paths", "server", "nodes", "execution",
                 "node_helpers")  # fmt: skip


def library_modules() -> list[str]:
    """Dotted names under lora_core of every .py file in it (packages by their __init__)."""
    names = []
    for path in sorted((REPO / "lora_core").rglob("*.py")):
        parts = path.relative_to(REPO / "lora_core").with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


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
    importlib.import_module(("lora_foundry.lora_core." + name).rstrip("."))
    found[name] = sorted(m for m in sys.modules if m.split(".")[0] in {comfy!r})
print(json.dumps(found))
"""


@pytest.mark.timeout(180)
def test_every_module_imports_without_comfy():
    modules = library_modules()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(repo=str(REPO), modules=modules, comfy=COMFY_MODULES)],
        capture_output=True,
        text=True,
        timeout=170,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert set(found) == set(modules)
    assert {name: mods for name, mods in found.items() if mods} == {}


def test_the_walk_finds_every_module_and_sub_package():
    modules = library_modules()
    assert len(modules) == len(list((REPO / "lora_core").rglob("*.py")))
    assert {"", "train", "caption", "train.trainer", "caption.tagger"} <= set(modules)
