// LoRA Foundry: after a run, shows a node's report (ui "text"), trigger words (ui "trigger_words") and
// per-image captions (ui "captions") in a panel on the node. Every pack node that returns ui text gets one.
// When a node wrote a new LoRA file (ui LORA_WRITTEN), the LoRA lists of every node are refreshed, as
// pressing R would, so the new file can be picked at once.
import { app } from "../../../scripts/app.js";
import { LORA_WRITTEN, PACK_PREFIX, addDisplayWidget, chain, el, fitNode } from "./common.js";

const PANEL = "foundry_report";
const LINE_PX = 15;
const CHROME_PX = 32; // panel padding and border, and the margin ComfyUI keeps around DOM widgets

function panelFor(node) {
  if (node.__lfPanel) return node.__lfPanel;
  const root = el("div", { className: "lf-panel" });
  root.dataset.loraFoundry = "report";
  const state = { root, height: 0 };
  addDisplayWidget(node, PANEL, root, () => Math.min(240, CHROME_PX + state.height), () => 480);
  node.__lfPanel = state;
  return state;
}

function triggerLine(words) {
  const chips = words.map((w) => {
    const chip = el("span", { className: "lf-chip", textContent: w, title: "click to copy" });
    chip.addEventListener("click", () => navigator.clipboard?.writeText(w).catch(() => {}));
    return chip;
  });
  return el("div", { className: "lf-triggers" }, ["trigger words: ", ...chips]);
}

/** Fills the panel from an executed message; returns nothing when the message has no text. */
export function showReport(node, message) {
  const text = (message?.text ?? []).join("\n");
  const triggers = (message?.trigger_words ?? []).join(", ");
  const captions = message?.captions ?? [];
  if (!text && !triggers && !captions.length) return;
  const panel = panelFor(node);
  const words = triggers.split(",").map((w) => w.trim()).filter(Boolean);
  const parts = [];
  if (words.length) parts.push(triggerLine(words));
  if (text) parts.push(el("pre", { textContent: text }));
  for (const caption of captions) parts.push(el("div", { className: "lf-caption", textContent: caption }));
  panel.root.replaceChildren(...parts);
  panel.height = (words.length ? 22 : 0) + LINE_PX * (text.split("\n").length + captions.length);
  fitNode(node);
}

let refreshing = false;
let again = false;

/** Refreshes every node's file lists; calls made while a refresh runs add one more refresh after it. */
export async function refreshLoraLists() {
  if (refreshing) {
    again = true;
    return;
  }
  refreshing = true;
  try {
    do {
      again = false;
      await app.refreshComboInNodes();
    } while (again);
  } catch (err) {
    console.warn("LoRA Foundry: could not refresh the LoRA lists", err);
  } finally {
    refreshing = false;
  }
}

app.registerExtension({
  name: "LoraFoundry.Report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith(PACK_PREFIX)) return;
    chain(nodeType.prototype, "onExecuted", function (message) {
      showReport(this, message);
      if (message?.[LORA_WRITTEN]?.length) refreshLoraLists();
    });
  },
});
