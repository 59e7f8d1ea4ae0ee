"""tests/unit never imports ComfyUI, directly or through a helper or a pack module: it tests the
library alone, as lora_core is written to be used. Read from the source (every import statement,
also inside functions), so a test added later that needs ComfyUI fails here, not silently on one leg."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "tests" / "unit"
# Top-level modules of a ComfyUI tree (what tests/conftest.py puts on sys.path).
COMFY_ROOTS = {
    "comfy", "comfy_extras", "comfy_api", "comfy_api_nodes", "comfy_execution", "comfy_config",
    "folder_paths", "server", "nodes", "execution", "node_helpers", "latent_preview", "comfyui_version",
}  # fmt: skip
PACKAGE = "lora_foundry"  # the repository, as tests/conftest.py registers it
FLAT_DIRS = (REPO / "tests", REPO / "scripts")  # pyproject's pytest pythonpath


def _module_file(name: str) -> Path | None:
    """The file of a module of this repository (the pack, a test helper or a script), else None."""
    parts = name.split(".")
    if parts[0] == PACKAGE:
        base = REPO.joinpath(*parts[1:]) if len(parts) > 1 else REPO
        candidates = [base.with_suffix(".py"), base / "__init__.py"] if len(parts) > 1 else []
    else:
        candidates = [d.joinpath(*parts).with_suffix(".py") for d in FLAT_DIRS]
    return next((c for c in candidates if c.is_file()), None)


def _package_of(path: Path) -> str | None:
    """The dotted package a file of the pack belongs to (for its relative imports)."""
    try:
        rel = path.relative_to(REPO)
    except ValueError:
        return None
    if rel.parts[0] in ("tests", "scripts"):
        return None
    return ".".join((PACKAGE, *rel.parts[:-1]))


def imported_modules(path: Path) -> set[str]:
    """Every module a file's import statements name, relative imports made absolute."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = _package_of(path)
                if package is None:
                    continue
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            names.add(module)
            # "from package import submodule" imports the submodule too.
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def comfy_imports_reached(start: Path) -> list[str]:
    """The import chains from `start` that end in a ComfyUI module, following this repository's own
    modules (pack, helpers, scripts) transitively."""
    found, seen, todo = [], {start}, [(start, start.name)]
    while todo:
        path, chain = todo.pop()
        for name in sorted(imported_modules(path)):
            if name.split(".")[0] in COMFY_ROOTS:
                found.append(f"{chain} -> {name}")
                continue
            target = _module_file(name)
            if target and target not in seen:
                seen.add(target)
                todo.append((target, f"{chain} -> {name}"))
    return found


def test_unit_tests_never_reach_comfyui():
    files = sorted(UNIT.glob("*.py"))
    assert len(files) > 5, f"expected the unit tests in {UNIT}"
    reached = [chain for f in files for chain in comfy_imports_reached(f)]
    assert reached == [], "tests/unit must not import ComfyUI (it tests the library alone):\n" + "\n".join(
        reached
    )


def test_the_scan_sees_comfy_through_a_helper_and_a_relative_import(tmp_path):
    """The scanner itself: it follows a helper script and the pack's relative imports to ComfyUI."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("def f():\n    import model_factory\n    from lora_foundry.nodes import comfy_bridge\n")
    reached = comfy_imports_reached(probe)
    assert any(chain.startswith("test_probe.py -> model_factory -> comfy") for chain in reached), reached
    assert any("lora_foundry.nodes.comfy_bridge -> comfy" in chain for chain in reached), reached
    clean = tmp_path / "test_clean.py"
    clean.write_text("import torch\nfrom lora_foundry.lora_core import adapters\n")
    assert comfy_imports_reached(clean) == []
