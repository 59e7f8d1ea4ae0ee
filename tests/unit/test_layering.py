"""lora_core's sub-packages import one way (issue #18): adapters <- files <- apply <- merge <- train /
caption, and nothing in lora_core reaches the node pack (nodes/) above it."""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "lora_core"
# What each sub-package may import from lora_core besides itself (budget.py sits beside them).
ALLOWED = {
    "adapters": set(),
    "files": {"adapters"},
    "apply": {"adapters", "files"},
    "merge": {"adapters", "files", "apply", "budget"},
    "caption": {"files"},
    "train": {"adapters", "files", "apply", "caption"},
    "budget": set(),
}


def lora_core_imports(path: Path) -> set[str]:
    """The lora_core-level names a file's relative imports reach (its own package excluded)."""
    package = path.relative_to(CORE).parts[0].removesuffix(".py")
    depth = len(path.relative_to(CORE).parts) - 1  # 0: top level, 1: inside a sub-package
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        if node.level > depth + 1:
            found.add("<above lora_core>")
            continue
        if node.level == depth + 1:  # relative to lora_core itself
            first = (node.module or "").split(".")[0]
            found |= {first} if first else {a.name for a in node.names}
        elif depth == 1:
            found.add(package)
    return found - {package}


FILES = sorted(p for p in CORE.rglob("*.py") if p.parent != CORE or p.name == "budget.py")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CORE)))
def test_imports_go_one_way(path):
    package = path.relative_to(CORE).parts[0].removesuffix(".py")
    assert lora_core_imports(path) <= ALLOWED[package]


def test_the_top_level_holds_only_the_packages_and_budget():
    assert sorted(p.name for p in CORE.glob("*.py")) == ["__init__.py", "budget.py"]
    assert {p.name for p in CORE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(ALLOWED) - {
        "budget"
    }


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    fake = CORE / "files" / "x.py"
    monkeypatch.setattr(
        Path, "read_text", lambda self: "from ..apply.loader import plan_lora\nfrom ...nodes import x\n"
    )
    assert lora_core_imports(fake) == {"apply", "<above lora_core>"}
