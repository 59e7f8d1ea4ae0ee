"""One atomic writer (issue #18): every file the pack writes goes through lora_core/files/atomic.py,
so captions and prepared images get the user's umask mode like LoRA files, and no other module
makes its own temp files or renames them into place."""

import ast
import os
from pathlib import Path

import pytest

from lora_foundry.lora_core.caption.captions import write_text_atomic
from lora_foundry.lora_core.files.confine import create_new

REPO = Path(__file__).resolve().parents[2]
# Calls that make a temp file or publish one: only the writer itself may use them.
OWN_TEMPS = {("tempfile", "mkstemp"), ("tempfile", "NamedTemporaryFile"), ("os", "replace"), ("os", "rename")}


def temp_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        named = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        if named and (node.value.id, node.attr) in OWN_TEMPS:
            found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    return found


SOURCES = sorted([*(REPO / "lora_core").rglob("*.py"), *(REPO / "nodes").glob("*.py")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_but_the_writer_makes_and_renames_its_own_temps(path):
    if path == REPO / "lora_core" / "files" / "atomic.py":
        assert temp_calls(path)  # the writer does: the check would see it
    else:
        assert temp_calls(path) == []


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_captions_and_new_files_take_the_umask_mode(tmp_path, umask_027):
    write_text_atomic(tmp_path / "a.txt", "cat, dog\n")
    create_new(tmp_path / "b.txt", lambda tmp: tmp.write_text("x"))
    for name in ("a.txt", "b.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == umask_027
    assert (tmp_path / "a.txt").read_bytes() == b"cat, dog\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temp left
