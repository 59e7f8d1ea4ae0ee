"""Launch Train Job in the real frontend: a graph built in the page (Export Train Job's job_path into
Launch Train Job), queued from the browser; the job trains in its own process and its progress
events draw the loss chart on the launch node."""

from __future__ import annotations

import pytest
from job_run import COMPACT

pytestmark = pytest.mark.server

CHECKPOINT = COMPACT  # linked into the server's models/checkpoints by tests/server_fixtures.py
STEPS = 3

BUILD = """([checkpoint, dataset, steps]) => {
  const exporter = LiteGraph.createNode("LoraFoundry_ExportTrainJob");
  const launcher = LiteGraph.createNode("LoraFoundry_LaunchTrainJob");
  exporter.pos = [20, 20];
  launcher.pos = [520, 20];
  app.graph.add(exporter);
  app.graph.add(launcher);
  const values = { checkpoint, folder: dataset, resolution: 64, steps, rank: 4, alpha: 4,
                   output_name: "browser_launch", existing: "overwrite", save_dtype: "fp32", seed: 3 };
  for (const [name, value] of Object.entries(values)) {
    const widget = exporter.widgets.find((w) => w.name === name);
    if (!widget) throw new Error("Export Train Job has no widget " + name);
    widget.value = value;
  }
  launcher.widgets.find((w) => w.name === "cpu_threads").value = 1;
  const slot = launcher.inputs.findIndex((i) => i.name === "job_path");
  if (slot < 0) throw new Error("Launch Train Job has no job_path input");
  exporter.connect(0, launcher, slot);
  return launcher.id;
}"""


@pytest.mark.timeout(1200)
def test_launched_job_draws_the_loss_chart_on_its_node(comfy, server, demo_models, object_info):
    assert "LoraFoundry_LaunchTrainJob" in object_info
    node = comfy.js(BUILD, [CHECKPOINT, demo_models["dataset"].name, STEPS])
    assert comfy.js("(id) => app.graph.getNodeById(id).__lfLoss.points.length", node) == 0
    entry = server.wait(comfy.queue(), timeout=900)  # raises with the node's error if it failed
    assert entry["outputs"][str(node)]["text"][0].startswith("browser_launch/browser_launch.safetensors")
    comfy.page.wait_for_function(
        "([id, n]) => app.graph.getNodeById(id).__lfLoss.points.length === n",
        arg=[node, STEPS],
        timeout=30_000,
    )
    header = comfy.js("(id) => app.graph.getNodeById(id).__lfLoss.header()", node)
    assert f"step {STEPS}/{STEPS}" in header, header
    assert comfy.loss_line_pixels(node) > 20, "the loss line was not drawn"
    comfy.shot("train_launch_node", node)
