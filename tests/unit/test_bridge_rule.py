"""Only the bridge imports ComfyUI (issue #18): nodes/comfy_bridge.py and nodes/comfy_bridge_*.py may
import ComfyUI's modules; every other file in nodes/ goes through them."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFY_MODULES = {"comfy", "comfy_extras", "comfy_api", "folder_paths", "server", "nodes", "execution",
                 "node_helpers", "latent_preview"}  # fmt: skip
NODE_FILES = sorted(p.name for p in (REPO / "nodes").glob("*.py"))


def is_bridge(name: str) -> bool:
    return name == "comfy_bridge.py" or (name.startswith("comfy_bridge_") and name.endswith(".py"))


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("name", [n for n in NODE_FILES if not is_bridge(n)])
def test_node_modules_but_the_bridge_import_no_comfy_module(name):
    assert imported_modules(REPO / "nodes" / name) & COMFY_MODULES == set()


def test_every_node_file_is_checked_and_the_bridge_is_the_exception():
    checked = [n for n in NODE_FILES if not is_bridge(n)]
    assert {"caption.py", "train.py", "merge.py", "load_lora.py", "stack.py", "__init__.py"} <= set(checked)
    assert "comfy_bridge.py" in NODE_FILES and "comfy_bridge.py" not in checked
    # The bridge is what imports ComfyUI: if it stopped, this test would check nothing real.
    assert imported_modules(REPO / "nodes" / "comfy_bridge.py") & COMFY_MODULES


def test_bridge_names():
    assert is_bridge("comfy_bridge.py") and is_bridge("comfy_bridge_train.py")
    assert not is_bridge("comfy_bridges.py") and not is_bridge("my_comfy_bridge.py")


def test_the_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f():\n    import folder_paths\n    from comfy.utils import ProgressBar\n"
        "    import node_helpers, comfy_api.latest\n    from . import nodes\n"
    )
    assert imported_modules(sample) & COMFY_MODULES == {"folder_paths", "comfy", "node_helpers", "comfy_api"}
