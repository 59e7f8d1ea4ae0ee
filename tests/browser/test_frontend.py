"""The pack in the real ComfyUI frontend: the extension loads, every shipped workflow opens from the
templates dialog and runs, rows set in the LoRA Stack widget reach Python, the loss chart draws."""

from __future__ import annotations

import json
import os
from importlib.metadata import version

import pytest
from comfy_server import PACK_LINK_NAME, REPO
from job_run import COMPACT

pytestmark = pytest.mark.server

WORKFLOWS = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
# In the page the SD1.5 training workflow trains the compact SD1.5 checkpoint (job_run.COMPACT),
# picked in its checkpoint loader once the graph is checked, as a user picks a model: the full-size
# demo checkpoint trains it over HTTP in tests/server, and the page draws the same. Pictures for the
# docs (LORA_FOUNDRY_DOCS_IMAGES=1) are made with the demo checkpoint.
COMPACT_IN_PAGE = () if os.environ.get("LORA_FOUNDRY_DOCS_IMAGES") == "1" else ("train_lora",)
# The Flux workflow trains a model 3072 wide, a minute here. It runs on each ComfyUI's own frontend;
# on the passes with the newest frontend (LORA_FOUNDRY_FRONTEND_ROOT, scripts/run_tests.sh) it is
# opened and checked only (test_flux_workflow_opens_from_templates): the Train LoRA node and chart it
# would draw run there in train_lora.
RUN = [n for n in WORKFLOWS if not (os.environ.get("LORA_FOUNDRY_FRONTEND_ROOT") and n == "train_lora_flux")]
SET_CHECKPOINT = """(name) => app.graph.nodes.filter((n) => n.type === "CheckpointLoaderSimple").forEach((n) => {
  n.widgets.find((w) => w.name === "ckpt_name").value = name;
})"""
TRAIN_EVENT = "lora_foundry.train"  # nodes/comfy_bridge_train.py TRAIN_EVENT
ROWS = "rows_json"  # lora_core/apply/stack.py ROWS
EXTENSIONS = ("LoraFoundry.Report", "LoraFoundry.StackRows", "LoraFoundry.LossChart")


def test_the_frontend_is_the_one_asked_for(comfy):
    """The page runs the frontend build these tests are meant for: the one ComfyUI's requirements
    install, or the one named in LORA_FOUNDRY_FRONTEND_VERSION (run_tests.sh: the newest release)."""
    expected = os.environ.get("LORA_FOUNDRY_FRONTEND_VERSION") or version("comfyui-frontend-package")
    assert comfy.js("() => window.__COMFYUI_FRONTEND_VERSION__") == expected


def test_page_loads_with_the_pack(comfy, object_info):
    names = comfy.js("() => app.extensions.map((e) => e.name)")
    assert set(EXTENSIONS) <= set(names), f"our extensions are not all registered: {names}"
    ours = sorted(k for k in object_info if k.startswith("LoraFoundry_"))
    missing = comfy.js("(ids) => ids.filter((id) => !LiteGraph.registered_node_types[id])", ours)
    assert ours and not missing, f"node types the frontend does not know: {missing}"


def open_template(comfy, name: str) -> None:
    """Opens a workflow the way a user does: Templates, the pack's category, then its card."""
    page = comfy.page
    comfy.js("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.get_by_role("dialog")  # nodes show the pack's name too ("Nodes 2.0" badges)
    dialog.get_by_text(PACK_LINK_NAME, exact=True).first.click(timeout=30_000)
    dialog.get_by_text(name, exact=True).first.click(timeout=30_000)
    page.wait_for_function("() => app.graph.nodes.length > 0", timeout=30_000)
    dialog.wait_for(state="hidden", timeout=30_000)


# Each loaded node's type, serialized widget values and the names of its widgets (same positions:
# the frontend writes a null for a widget it does not save).
LOADED_NODES = """() => app.graph.serialize().nodes.map((s) => ({
  id: s.id, type: s.type, values: s.widgets_values ?? [],
  names: (app.graph.getNodeById(s.id)?.widgets ?? []).map((w) => w.name),
}))"""
# The widget the frontend adds after a seed-like INT input; workflow files hold its value.
CONTROL_WIDGET = "control_after_generate"


def widgets_to_compare(node: dict, object_info: dict) -> list:
    """The widget values of a loaded node to compare with the file's. The pack's nodes: all of them,
    as saved. Other nodes: those of the inputs the server declares (and the seed control), since
    newer frontends add widgets of their own to core nodes (1.35+: PreviewAny's preview and mode
    widgets, named differently per release) that a file written for an older frontend does not hold."""
    if node["type"].startswith("LoraFoundry_") or node["type"] not in object_info:
        return node["values"]
    info = object_info[node["type"]]["input"]
    declared = {*info.get("required", {}), *info.get("optional", {}), CONTROL_WIDGET}
    values = node["values"]
    # Trailing widgets that are not saved have no value; a value with no widget is kept (and differs).
    names = (node["names"] + [None] * len(values))[: len(values)]
    return [v for name, v in zip(names, values, strict=True) if name is None or name in declared]


def graph_problems(comfy, workflow: dict, object_info: dict) -> list[str]:
    """Nodes the frontend does not know, and widget values it did not keep, after loading."""
    by_id = {n["id"]: n for n in comfy.js(LOADED_NODES)}
    problems = []
    unknown = comfy.js(
        "() => app.graph.nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type)"
    )
    problems += [f"unknown node type {t}" for t in unknown]
    for node in workflow["nodes"]:
        got = by_id.get(node["id"])
        if got is None:
            problems.append(f"node {node['id']} ({node['type']}) was not loaded")
            continue
        kept = widgets_to_compare(got, object_info)
        if kept != node.get("widgets_values", []):
            problems.append(
                f"node {node['id']} ({node['type']}) widgets {kept} (of {got['values']}, named "
                f"{got['names']}) != file {node.get('widgets_values')}"
            )
    return problems


def test_widget_comparison_leaves_out_only_what_the_frontend_adds_to_core_nodes():
    """The comparison above, on hand-made loaded nodes: it must not hide a changed value."""
    info = {
        "PreviewAny": {"input": {"required": {"source": ["*", {}]}}},
        "KSampler": {"input": {"required": {"seed": ["INT", {}], "steps": ["INT", {}]}}},
        "LoraFoundry_LoraStack": {"input": {"required": {"rows_json": ["STRING", {}]}}},
    }
    preview = {
        "type": "PreviewAny",
        "values": [None, None, False],
        "names": ["preview", "preview", "previewMode"],
    }
    assert widgets_to_compare(preview, info) == []
    sampler = {"type": "KSampler", "values": [43, "fixed", 2], "names": ["seed", CONTROL_WIDGET, "steps"]}
    assert widgets_to_compare(sampler, info) == [43, "fixed", 2]  # a changed seed still shows
    extra_value = {
        "type": "KSampler",
        "values": [42, "fixed", 2, 7],
        "names": ["seed", CONTROL_WIDGET, "steps"],
    }
    assert widgets_to_compare(extra_value, info) == [42, "fixed", 2, 7]
    # The pack's nodes keep every saved value, also of widgets the server does not declare.
    ours = {"type": "LoraFoundry_LoraStack", "values": ["[]", None], "names": ["rows_json", "foundry_rows"]}
    assert widgets_to_compare(ours, info) == ["[]", None]
    note = {"type": "Note", "values": ["text"], "names": ["text"]}  # frontend-only: all kept
    assert widgets_to_compare(note, info) == ["text"]


def test_flux_workflow_opens_from_templates(comfy, server, object_info):
    workflow = json.loads((REPO / "workflows" / "train_lora_flux.json").read_text())
    open_template(comfy, "train_lora_flux")
    problems = graph_problems(comfy, workflow, object_info)
    assert not problems, problems


@pytest.mark.parametrize("name", RUN)
def test_shipped_workflow_opens_from_templates_and_runs(comfy, server, demo_models, object_info, name):
    workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    open_template(comfy, name)
    problems = graph_problems(comfy, workflow, object_info)
    assert not problems, problems
    if name in COMPACT_IN_PAGE:
        comfy.js(SET_CHECKPOINT, COMPACT)
    comfy.js("() => app.canvas.ds.scale = 0.7")
    entry = server.wait(comfy.queue(), timeout=900)  # raises with the node's error if it failed
    # What each workflow writes is checked in tests/server; here: it ran from the browser, and shows it.
    types = {str(n["id"]): n["type"] for n in workflow["nodes"]}
    for node_id, out in entry["outputs"].items():
        if types.get(node_id, "").startswith("LoraFoundry_") and out.get("text"):
            first_line = out["text"][0].splitlines()[0][:40]
            comfy.page.wait_for_function(
                "([id, text]) => app.graph.getNodeById(Number(id))?.__lfPanel?.root.textContent.includes(text)",
                arg=[node_id, first_line],
                timeout=30_000,
            )
    for node_id in comfy.nodes_of("LoraFoundry_TrainLora"):
        points = comfy.js("(id) => app.graph.getNodeById(id).__lfLoss.points.length", node_id)
        assert points > 0, f"the loss chart of Train LoRA node {node_id} drew no points"
        comfy.shot(f"{name}_train_node_{node_id}", node_id)
    write_doc_images(comfy, name)


# Pictures for the README and docs (LORA_FOUNDRY_DOCS_IMAGES=1): per workflow, the picture's name and
# the node types it shows; every workflow also gets workflow_<name>.png of its whole graph.
DOC_NODES = {
    "load_lora": {"load_lora_report": ["LoraFoundry_LoadLora"]},
    "stack_merge": {"merge_report": ["LoraFoundry_MergeLoras", "PreviewAny"]},
    "resize_lora": {"resize_report": ["LoraFoundry_ResizeLora", "PreviewAny"]},
    "caption_dataset": {"caption_previews": ["LoraFoundry_CaptionDataset"]},
    "train_lora": {"train_lora_node": ["LoraFoundry_TrainLora"]},
}
# The nodes that take Train LoRA's loss_curve output (a SaveImage in the shipped workflow).
CURVE_VIEWERS = """() => app.graph.nodes.filter((n) => n.inputs?.some((i) => {
  const link = i.link != null && app.graph.links[i.link];
  const origin = link && app.graph.getNodeById(link.origin_id);
  return origin?.type === "LoraFoundry_TrainLora" && origin.outputs[link.origin_slot].name === "loss_curve";
})).map((n) => n.id)"""


def write_doc_images(comfy, name: str) -> None:
    shown = comfy.js("() => app.graph.nodes.filter((n) => n.type !== 'Note').map((n) => n.id)")
    comfy.doc_shot(f"workflow_{name}", shown)
    for picture, node_types in DOC_NODES.get(name, {}).items():
        comfy.doc_shot(picture, [i for t in node_types for i in comfy.nodes_of(t)])
    if name == "train_lora" and (viewers := comfy.js(CURVE_VIEWERS)):
        comfy.doc_shot("loss_curve", viewers)


# --- LoRA Stack rows -------------------------------------------------------------------------

ROW_B = "lora_foundry_row_b.safetensors"
ROW_B_TRIGGER = "rowbword"


@pytest.fixture
def row_loras(demo_models, server_loras):
    """The demo LoRA and a copy with its own trigger word, so the result tells them apart."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = server_loras / ROW_B
    if not path.exists():
        with safe_open(str(demo_models["lora"]), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            meta = dict(f.metadata())
        meta["ss_tag_frequency"] = json.dumps({"b": {ROW_B_TRIGGER: 5}})
        save_file(tensors, str(path), metadata=meta)
    return demo_models["lora"].name, ROW_B


STACK_GRAPH = """async ([ckpt]) => {
  const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
  const ck = add("CheckpointLoaderSimple", [20, 120]);
  ck.widgets.find((w) => w.name === "ckpt_name").value = ckpt;
  const stack = add("LoraFoundry_LoraStack", [360, 20]);
  const apply = add("LoraFoundry_ApplyLoraStack", [830, 120]);
  const preview = add("PreviewAny", [1180, 120]);
  ck.connect(0, apply, apply.findInputSlot("model"));
  ck.connect(1, apply, apply.findInputSlot("clip"));
  stack.connect(0, apply, apply.findInputSlot("lora_stack"));
  apply.connect(apply.findOutputSlot("trigger_words"), preview, 0);
  app.graph.setDirtyCanvas(true, true);
  return { stack: stack.id, apply: apply.id };
}"""


def test_stack_rows_reach_python(comfy, server, row_loras):
    lora_a, lora_b = row_loras
    page = comfy.page
    comfy.js("() => app.refreshComboInNodes()")
    ids = comfy.js(STACK_GRAPH, ["lora_foundry_demo_sd15.safetensors"])
    rows = page.locator("[data-lora-foundry=rows]")
    rows.locator(".lf-add").click()
    rows.locator(".lf-add").click()
    first, second = rows.locator(".lf-row").nth(0), rows.locator(".lf-row").nth(1)
    first.locator("select").select_option(lora_a)
    first.locator("input[type=number]").nth(0).fill("0.7")
    first.locator("input[type=number]").nth(0).press("Tab")
    second.locator("select").select_option(lora_b)
    second.locator("input[type=checkbox]").uncheck()
    hidden = "([id, name]) => app.graph.getNodeById(id).widgets.find((w) => w.name === name).hidden"
    assert comfy.js(hidden, [ids["stack"], ROWS]) is True, "the raw rows_json text widget is shown"

    entry = server.wait(comfy.queue(), timeout=600)
    sent = json.loads(entry["prompt"][2][str(ids["stack"])]["inputs"][ROWS])
    assert [(r["lora"], r["on"], r["strength_model"]) for r in sent] == [
        (lora_a, True, 0.7),
        (lora_b, False, 1.0),
    ]
    ui = entry["outputs"][str(ids["apply"])]
    assert "foundrystyle" in ui["trigger_words"][0] and ROW_B_TRIGGER not in ui["trigger_words"][0], ui

    second.locator("input[type=checkbox]").check()  # row B on: its trigger word must now come back
    entry = server.wait(comfy.queue(), timeout=600)
    ui = entry["outputs"][str(ids["apply"])]
    assert ROW_B_TRIGGER in ui["trigger_words"][0], ui
    panel = (
        f"() => app.graph.getNodeById({ids['apply']}).__lfPanel?.root.textContent.includes('{ROW_B_TRIGGER}')"
    )
    page.wait_for_function(panel, timeout=30_000)
    comfy.shot("stack_rows_after_run")
    comfy.doc_shot("stack_rows", [ids["stack"], ids["apply"]])

    # A saved workflow keeps the rows: reload it and the widget shows the same two rows.
    comfy.js(
        "async () => { const wf = app.graph.serialize(); app.graph.clear(); await app.loadGraphData(wf); }"
    )
    assert rows.locator(".lf-row").count() == 2
    assert rows.locator(".lf-row").nth(1).locator("select").input_value() == lora_b


# --- new LoRA files show up in the lists -------------------------------------------------------

REFRESH_GRAPH = """async ([lora, outName]) => {
  const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
  const resize = add("LoraFoundry_ResizeLora", [20, 40]);
  const set = (node, name, value) => { node.widgets.find((w) => w.name === name).value = value; };
  set(resize, "lora_name", lora);
  set(resize, "rank", 4);
  set(resize, "output_name", outName);
  set(resize, "overwrite", true);
  const load = add("LoraFoundry_LoadLora", [420, 40]);
  const stack = add("LoraFoundry_LoraStack", [420, 300]);
  app.graph.setDirtyCanvas(true, true);
  return { load: load.id, stack: stack.id };
}"""

LISTS = """([loadId, stackId]) => {
  const load = app.graph.getNodeById(loadId).widgets.find((w) => w.name === "lora_name").options.values;
  const rows = app.graph.getNodeById(stackId).__lfRows.root.querySelectorAll(".lf-row select option");
  return { load: [...load], rows: [...rows].map((o) => o.value) };
}"""


def test_written_lora_appears_in_the_lists_without_refresh(comfy, server, demo_models):
    """After Resize LoRA writes a file, Load LoRA's combo and the stack's row pickers list it (no R)."""
    out_name = "lf_browser_refreshed"
    new_file = f"{out_name}.safetensors"
    page = comfy.page
    comfy.js("() => app.refreshComboInNodes()")  # the session's list, whatever earlier tests wrote
    ids = comfy.js(REFRESH_GRAPH, [demo_models["lora"].name, out_name])
    comfy.js("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")  # all on screen
    comfy.click_when_still("[data-lora-foundry=rows] .lf-add")
    before = comfy.js(LISTS, [ids["load"], ids["stack"]])
    assert before["rows"], "the stack row has no LoRA picker"
    assert new_file not in before["load"] and new_file not in before["rows"], before

    entry = server.wait(comfy.queue(), timeout=600)
    resize_out = next(o for o in entry["outputs"].values() if "lora_written" in o)
    assert resize_out["lora_written"] == [new_file], resize_out
    page.wait_for_function(
        f"(ids) => {{ const l = ({LISTS})(ids); return l.load.includes('{new_file}') && l.rows.includes('{new_file}'); }}",
        arg=[ids["load"], ids["stack"]],
        timeout=30_000,
    )


# --- Train LoRA loss chart ---------------------------------------------------------------------

CHART_NODE = """async ([trainType, known]) => {
  let node;
  if (known) {
    node = LiteGraph.createNode(trainType);
  } else {  // Train LoRA not registered yet: the chart on a plain node, from the extension's module
    const { LossChart } = await import("/extensions/lora-foundry/js/loss_chart.js");
    node = LiteGraph.createNode("Note");
    node.__lfLoss = new LossChart(node);
    node.setSize([400, 260]);
  }
  node.pos = [40, 40];
  app.graph.add(node);
  return node.id;
}"""

SEND_EVENTS = """([event, id, from, to]) => {
  for (let step = from; step <= to; step++) {
    const loss = 0.2 + 0.5 * Math.exp(-step / 8) + 0.03 * Math.sin(step * 1.7);
    window.comfyAPI.api.api.dispatchCustomEvent(event,
      { node: String(id), step, total: 40, loss, lr: 1e-4, eta_s: (40 - step) * 6.5 });
  }
}"""


def test_loss_chart_draws_training_events(comfy, object_info):
    known = "LoraFoundry_TrainLora" in object_info
    node = comfy.js(CHART_NODE, ["LoraFoundry_TrainLora", known])
    comfy.js(SEND_EVENTS, [TRAIN_EVENT, node, 1, 30])
    chart = comfy.js(
        "(id) => { const c = app.graph.getNodeById(id).__lfLoss; return [c.points.length, c.header()]; }",
        node,
    )
    assert chart[0] == 30, chart
    assert "step 30/40" in chart[1] and "1m 05s left" in chart[1], chart[1]
    assert comfy.loss_line_pixels(node) > 50, "the smoothed loss line was not drawn"
    comfy.page.wait_for_timeout(200)  # the screenshot at teardown shows the chart mid-run
    comfy.doc_shot("loss_chart_live", [node])
    comfy.js(SEND_EVENTS, [TRAIN_EVENT, node, 1, 1])  # a new run starts a new curve
    assert comfy.js("(id) => app.graph.getNodeById(id).__lfLoss.points.length", node) == 1
    comfy.js(SEND_EVENTS, [TRAIN_EVENT, node, 2, 30])
