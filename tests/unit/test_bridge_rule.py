"""Only the bridge imports ComfyUI (issue #18): nodes/comfy_bridge.py and nodes/comfy_bridge_*.py;
every other module of nodes/ goes through them."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFY_MODULES = {"comfy", "comfy_extras", "comfy_api", "folder_paths", "server", "nodes", "node_helpers", "execution",
                 "latent_preview"}  # fmt: skip
NODE_MODULES = sorted(p.name for p in (REPO / "nodes").glob("*.py") if not p.name.startswith("comfy_bridge"))


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_bridge_modules_exist_and_others_are_checked():
    assert {"caption.py", "train.py", "load_lora.py"} <= set(NODE_MODULES)
    assert (REPO / "nodes" / "comfy_bridge_train.py").is_file()


@pytest.mark.parametrize("name", NODE_MODULES)
def test_node_modules_outside_the_bridge_import_no_comfy_module(name):
    assert imported_modules(REPO / "nodes" / name) & COMFY_MODULES == set()


def test_the_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import folder_paths\n    from comfy.utils import ProgressBar\n")
    assert imported_modules(sample) & COMFY_MODULES == {"folder_paths", "comfy"}
