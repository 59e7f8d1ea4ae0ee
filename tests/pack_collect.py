"""Pytest plugin (loaded with -p from pyproject.toml): the repository root is a ComfyUI pack (it has an __init__.py that imports ComfyUI),
so it is collected as a plain directory, never imported as a package. See tests/conftest.py."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_collect_directory(path, parent):
    if Path(path) == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
