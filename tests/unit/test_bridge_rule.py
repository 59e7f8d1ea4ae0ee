"""Only nodes/comfy_bridge.py imports ComfyUI (issue #18): the dataset nodes' module goes through it."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFY_MODULES = {"comfy", "comfy_extras", "folder_paths", "server", "nodes", "execution", "latent_preview"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("name", ["caption.py", "train.py"])
def test_dataset_node_modules_import_no_comfy_module(name):
    assert imported_modules(REPO / "nodes" / name) & COMFY_MODULES == set()


def test_the_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import folder_paths\n    from comfy.utils import ProgressBar\n")
    assert imported_modules(sample) & COMFY_MODULES == {"folder_paths", "comfy"}
