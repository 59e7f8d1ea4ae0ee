"""A Caption Dataset graph saved before the vision-language widgets (issue #20) loads in the real frontend
with every old value in its place and the new widgets at their defaults, and runs with the tagger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

OLD_GRAPH = Path(__file__).with_name(
    "caption_dataset_before_vlm.json"
)  # workflows/caption_dataset.json at 440becc
NEW_WIDGETS = {"captioner": "WD14 tagger (tags)", "prompt_preset": "detailed", "custom_prompt": "",
               "max_new_tokens": 160, "temperature": 0.0, "tag_hints": False, "strip_preamble": True}  # fmt: skip
CAPTION_NODE = """(id) => { const n = app.graph.getNodeById(id);
  return n.widgets.map((w) => [w.name, w.value]); }"""


@pytest.mark.timeout(900)
def test_graph_saved_before_the_vlm_widgets_keeps_its_values_and_runs(comfy, server, demo_models):
    workflow = json.loads(OLD_GRAPH.read_text())
    node = next(n for n in workflow["nodes"] if n["type"] == "LoraFoundry_CaptionDataset")
    assert len(node["widgets_values"]) == 15  # the file really is the old shape
    comfy.load(workflow)
    widgets = comfy.js(CAPTION_NODE, node["id"])
    assert [value for _, value in widgets[:15]] == node["widgets_values"]
    assert dict(widgets[15:]) == NEW_WIDGETS
    entry = server.wait(comfy.queue(), timeout=900)
    summary = entry["outputs"][str(node["id"])]["text"][0]
    assert " tagged, " in summary and "0 failed" in summary
