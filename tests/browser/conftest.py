"""The real ComfyUI frontend in headless Chromium (Debian's chromium driven by Playwright), against
the real-server fixtures. One browser and one page per session; each test starts from an empty
graph, fails on console errors from this pack's extension, and leaves a screenshot in
test-artifacts/comfyui-<version>/browser/ (browser-frontend-<version>/ for another frontend build).
With LORA_FOUNDRY_DOCS_IMAGES=1 (`make docs-images`), the tests also write the pictures of the
README and docs into docs/images/, cropped to the nodes that matter.
Set-up: scripts/setup_browser.sh."""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from comfy_server import PACK_LINK_NAME
from server_fixtures import ARTIFACTS as LEG_ARTIFACTS
from server_fixtures import (  # noqa: F401
    PASS_SUFFIX,
    VUE_NODES,
    demo_models,
    object_info,
    server,
    server_loras,
)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
ARTIFACTS = LEG_ARTIFACTS / f"browser{PASS_SUFFIX}"
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
# Made on the classic canvas only: one look for the docs, whatever passes run.
WRITE_DOCS_IMAGES = os.environ.get("LORA_FOUNDRY_DOCS_IMAGES") == "1" and not VUE_NODES
DOCS_IMAGE_LIMIT = 300 * 1024  # bytes: a README picture should not make the page slow to open
# Console text, failed URLs and stack frames that come from this pack's extension.
OURS = re.compile(
    rf"/extensions/{re.escape(PACK_LINK_NAME)}/|/extensions/scripts/|LoraFoundry|lora_foundry", re.I
)
# The frontend asks the Comfy registry about node ids; those requests are blocked here, not our errors.
EXTERNAL = re.compile(r"https?://(?!127\.0\.0\.1[:/])")


@dataclass
class PageLog:
    """Everything the page reported, so each test can check what happened during it."""

    entries: list[str] = field(default_factory=list)

    def ours_since(self, start: int) -> list[str]:
        return [
            e
            for e in self.entries[start:]
            if e.startswith(("error", "pageerror", "http")) and OURS.search(e) and not EXTERNAL.search(e)
        ]


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run scripts/setup_browser.sh")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no browser at {CHROMIUM}: run scripts/setup_browser.sh (or set CHROMIUM)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


def _record(page, log: PageLog) -> None:
    def on_console(msg):
        loc = msg.location or {}
        log.entries.append(f"{msg.type}: {msg.text} @ {loc.get('url', '')}")

    page.on("console", on_console)
    page.on("pageerror", lambda err: log.entries.append(f"pageerror: {err} {err.stack or ''}"))
    page.on("response", lambda r: r.status >= 400 and log.entries.append(f"http {r.status}: {r.url}"))


@pytest.fixture(scope="session")
def comfy_session(browser, server):  # noqa: F811 - the fixture imported above
    """The ComfyUI page with the pack loaded; other sites are blocked (the machine has no internet)."""
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    log = PageLog()
    _record(page, log)
    page.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), lambda route: route.abort())
    page.goto(server.url + "/", wait_until="domcontentloaded")
    page.wait_for_function(
        "() => window.app?.graph && window.app.extensions?.some((e) => e.name.startsWith('Comfy.'))",
        timeout=120_000,
    )
    if VUE_NODES:  # ComfyUI's "Nodes 2.0": nodes drawn by Vue components instead of the canvas
        page.evaluate("() => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true)")
        assert page.evaluate("() => app.extensionManager.setting.get('Comfy.VueNodes.Enabled')") is True
    page.wait_for_timeout(500)  # extensions finish their setup() after the first ones register
    # The "Nodes 2.0" banner covers the top of every screenshot; its close button has no label.
    banner_close = page.locator("div:has(> div > span:has-text('Introducing Nodes 2.0')) > button.right-4")
    if banner_close.count():
        banner_close.first.click(timeout=5_000)
    yield page, log
    page.close()


@pytest.fixture
def comfy(comfy_session, request):
    """The session's page with an empty graph; fails the test on errors from our extension."""
    page, log = comfy_session
    start = len(log.entries)
    page.evaluate("() => { app.graph.clear(); app.canvas.ds.scale = 1; app.canvas.ds.offset = [80, 120]; }")
    comfy = ComfyPage(page)
    yield comfy
    comfy.shot(request.node.name)
    errors = log.ours_since(start)
    assert not errors, "errors from the LoRA Foundry extension:\n" + "\n".join(errors)


# True when the element is shown and at the same place in two successive animation frames.
STILL = """(selector) => new Promise((done) => {
  const el = document.querySelector(selector);
  if (!el || !el.checkVisibility()) return done(false);
  const a = el.getBoundingClientRect();
  requestAnimationFrame(() => requestAnimationFrame(() => {
    const b = el.getBoundingClientRect();
    done(b.width > 0 && b.height > 0 && a.x === b.x && a.y === b.y && a.width === b.width);
  }));
})"""


# The loss chart's orange pixels (the loss line) on a node's chart canvas.
LOSS_LINE_PIXELS = """(id) => {
  const canvas = app.graph.getNodeById(id).__lfLoss.canvas;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] > 200 && data[i + 1] > 140 && data[i + 2] < 120) n++;
  return n;
}"""


class ComfyPage:
    """Small helpers over the page's ComfyUI app object."""

    def __init__(self, page):
        self.page = page

    def js(self, code: str, arg=None):
        return self.page.evaluate(code, arg)

    def load(self, workflow: dict) -> None:
        self.js("async (wf) => { await app.loadGraphData(wf); app.canvas.ds.scale = 0.8; }", workflow)

    def queue(self) -> str:
        """Queues the graph through the frontend; returns the prompt id the server gave it."""
        with self.page.expect_response(
            lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST", timeout=60_000
        ) as info:
            self.js("() => app.queuePrompt(0, 1)")
        resp = info.value
        body = resp.json()
        assert resp.status == 200, f"the server refused the prompt: {body}"
        return body["prompt_id"]

    def shot(self, name: str, node_id: int | None = None) -> None:
        """A screenshot <name>.png in ARTIFACTS of the whole graph, or of one node."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        select = "(id) => { app.canvas.deselectAll(); if (id != null) app.canvas.select(app.graph.getNodeById(id)); }"
        self.js(select, node_id)
        # FitView on an empty graph leaves an "Empty canvas" toast over later screenshots.
        self.js(
            "() => app.graph.nodes.length && app.extensionManager.command.execute('Comfy.Canvas.FitView')"
        )
        self.page.wait_for_timeout(400)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
        self.js("() => app.canvas.deselectAll()")

    def doc_shot(self, name: str, node_ids: list[int], pad: int = 24) -> Path | None:
        """docs/images/<name>.png: the nodes `node_ids` (and what their widgets show), zoomed to fill the
        view and cropped to them, as a palette PNG under DOCS_IMAGE_LIMIT. Only with
        LORA_FOUNDRY_DOCS_IMAGES=1; returns the path written, else None."""
        if not WRITE_DOCS_IMAGES:
            return None
        # A large window keeps a whole workflow at a zoom where the canvas still draws text (below
        # about 0.6 it draws widgets as empty bars); the minimap would cover a corner of the graph.
        size = self.page.viewport_size
        self.page.set_viewport_size(DOCS_VIEWPORT)
        self.js(HIDE_MINIMAP)
        try:
            self.page.wait_for_timeout(400)
            self.js(FIT_NODES, node_ids)
            self.page.wait_for_timeout(600)  # DOM widgets follow the canvas a frame or two later
            box = self.js(NODES_BOX, [node_ids, pad])
            png = self.page.screenshot(clip=box)
        finally:
            self.page.set_viewport_size(size)
            self.page.wait_for_timeout(400)
        return save_doc_image(png, DOCS_IMAGES / f"{name}.png")

    def click_when_still(self, selector: str) -> None:
        """Clicks an element of a node once the canvas has stopped moving it. After a view change,
        frontend 1.37 moves DOM widgets for a while on a busy machine; Playwright then scrolls the
        page's overflow-hidden containers to reach a moving element, which hides it for good."""
        self.page.wait_for_function(STILL, arg=selector, timeout=30_000)
        self.page.locator(selector).click()

    def loss_line_pixels(self, node_id: int) -> int:
        """How many pixels of the node's loss chart the loss line colours orange."""
        return self.js(LOSS_LINE_PIXELS, node_id)

    def nodes_of(self, node_type: str) -> list[int]:
        return self.js("(t) => app.graph.nodes.filter((n) => n.type === t).map((n) => n.id)", node_type)


DOCS_VIEWPORT = {"width": 2800, "height": 1700}
HIDE_MINIMAP = """() => {
  const setting = app.extensionManager?.setting;
  if (setting?.get('Comfy.Minimap.Visible')) setting.set('Comfy.Minimap.Visible', false);
}"""

# Zooms the canvas so the given nodes fill most of the view (at most 1.5x), with nothing selected.
FIT_NODES = """(ids) => {
  const nodes = ids.map((id) => app.graph.getNodeById(id));
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - title));
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  const el = app.canvas.canvas, ds = app.canvas.ds;
  const scale = Math.min(1.5, (0.9 * el.clientWidth) / (x1 - x0), (0.85 * el.clientHeight) / (y1 - y0));
  ds.scale = scale;
  ds.offset = [(el.clientWidth / scale - (x1 - x0)) / 2 - x0, (el.clientHeight / scale - (y1 - y0)) / 2 - y0];
  app.canvas.deselectAll();
  app.graph.setDirtyCanvas(true, true);
}"""

# The page rectangle of the given nodes (title bar included), padded, inside the canvas element.
NODES_BOX = """([ids, pad]) => {
  const nodes = ids.map((id) => app.graph.getNodeById(id));
  const title = LiteGraph.NODE_TITLE_HEIGHT, ds = app.canvas.ds;
  const rect = app.canvas.canvas.getBoundingClientRect();
  const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - title));
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  const left = Math.max(rect.left, rect.left + (x0 + ds.offset[0]) * ds.scale - pad);
  const top = Math.max(rect.top, rect.top + (y0 + ds.offset[1]) * ds.scale - pad);
  const right = Math.min(rect.right, rect.left + (x1 + ds.offset[0]) * ds.scale + pad);
  const bottom = Math.min(rect.bottom, rect.top + (y1 + ds.offset[1]) * ds.scale + pad);
  return { x: left, y: top, width: right - left, height: bottom - top };
}"""


def save_doc_image(png: bytes, path: Path, limit: int = DOCS_IMAGE_LIMIT) -> Path:
    """Writes a screenshot as an optimized 256-colour PNG (ComfyUI's flat UI loses nothing visible),
    shrunk by a quarter at a time until it is under `limit` bytes; a temp file is renamed over `path`."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        buffer = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
        if buffer.tell() <= limit or min(image.size) < 200:
            break
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return path
