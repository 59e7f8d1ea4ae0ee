"""The pack inside a real ComfyUI server: registration, templates, and the shipped workflows."""

from __future__ import annotations

import json
import re

import pytest
from build_workflows import WORKFLOWS
from comfy_server import PACK_LINK_NAME, REPO, output_files, ui_to_api

pytestmark = pytest.mark.server


def pack_node_ids() -> set[str]:
    # The registration table, read as text so this process need not import the pack.
    text = (REPO / "nodes" / "__init__.py").read_text()
    return set(re.findall(r'^\s*\("(LoraFoundry_\w+)"', text, re.M))


def test_every_node_is_registered(server, object_info):
    ids = pack_node_ids()
    assert ids, "no node ids found in nodes/__init__.py"
    missing = sorted(ids - set(object_info))
    assert not missing, f"nodes missing from /object_info: {missing}\n{server.log_tail()}"
    for node_id in ids:
        info = object_info[node_id]
        assert info["python_module"].endswith(PACK_LINK_NAME), info["python_module"]
        assert info["category"].startswith("LoRA Foundry")


def test_pack_imported_without_errors(server, object_info):
    log = server.log_text()
    pack_dir = f"custom_nodes/{PACK_LINK_NAME}"
    bad = [
        line
        for line in log.splitlines()
        if pack_dir in line and ("IMPORT FAILED" in line or "Cannot import" in line)
    ]
    assert not bad, "\n".join(bad)
    assert re.search(rf"\d+\.\d+ seconds: .*{pack_dir}$", log, re.M), "the pack is not in the import summary"


def test_every_input_has_a_tooltip(object_info):
    for node_id in pack_node_ids():
        info = object_info[node_id]["input"]
        for group in ("required", "optional"):
            for name, spec in info.get(group, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_workflows_are_listed_as_templates(server):
    templates = server.get("/workflow_templates")
    listed = set(templates.get(PACK_LINK_NAME, []))
    shipped = {p.stem for p in (REPO / "workflows").glob("*.json")}
    assert shipped and shipped <= listed, f"shipped {sorted(shipped)}, listed {sorted(listed)}"


def test_committed_workflows_match_the_builder():
    for name, make in WORKFLOWS.items():
        committed = json.loads((REPO / "workflows" / name).read_text())
        assert committed == make(), f"workflows/{name} is stale: run scripts/build_workflows.py"


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_shipped_workflow_runs(server, object_info, demo_models, name):
    workflow = json.loads((REPO / "workflows" / name).read_text())
    entry = server.run(ui_to_api(workflow, object_info), timeout=900)
    assert entry["outputs"], f"{name} produced no output"
    for f in output_files(entry):
        assert (server.base_dir / f).stat().st_size > 0
