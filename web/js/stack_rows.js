// LoRA Stack rows: any number of entries (LoRA picker, on/off, strengths, block weights) edited in a
// widget on the node and written as JSON into the node's hidden rows_json input, which Python reads.
import { app } from "../../../scripts/app.js";
import { NODE, ROWS, addDisplayWidget, chain, el, fitNode } from "./common.js";

const NONE = "None";
const ROW_PX = 26;
const MIN_WIDTH = 430; // room for the picker next to the strengths

function newRow(lora) {
  return { lora, on: true, strength_model: 1.0, strength_clip: 1.0, block_weights: "" };
}

/** Rows from the stored JSON; anything unreadable is kept out of the widget (Python names the error). */
export function parseRows(text) {
  if (!text || !String(text).trim()) return [];
  try {
    const rows = JSON.parse(text);
    if (!Array.isArray(rows)) return [];
    return rows
      .filter((r) => r && typeof r.lora === "string")
      .map((r) => ({ ...newRow(r.lora), ...r }));
  } catch {
    return [];
  }
}

function loraChoices(node) {
  // The slot combos list models/loras and are refreshed with the node definitions (see refreshComboInNode).
  const values = node.widgets?.find((w) => w.name === "lora_1")?.options?.values ?? [];
  return (Array.isArray(values) ? values : []).filter((v) => v !== NONE);
}

function hideWidget(widget) {
  widget.hidden = true;
  widget.options = { ...widget.options, hidden: true };
  widget.computeSize = () => [0, -4]; // older frontends lay out hidden widgets by size
}

function numberInput(value, title, onChange) {
  const input = el("input", { type: "number", step: "0.05", value: String(value), title });
  input.addEventListener("change", () => {
    const v = parseFloat(input.value);
    onChange(Number.isFinite(v) ? v : 1.0);
  });
  return input;
}

function loraSelect(choices, value, onChange) {
  const names = choices.includes(value) || !value ? choices : [value, ...choices];
  const select = el("select", { title: value || "pick a LoRA from models/loras" });
  for (const name of names) {
    const missing = name === value && !choices.includes(name);
    select.append(el("option", { value: name, textContent: missing ? `${name} (missing)` : name }));
  }
  select.value = value;
  select.addEventListener("change", () => onChange(select.value));
  return select;
}

class RowsEditor {
  constructor(node) {
    this.node = node;
    this.text = node.widgets.find((w) => w.name === ROWS);
    hideWidget(this.text);
    this.root = el("div", { className: "lf-rows" });
    this.root.dataset.loraFoundry = "rows";
    this.widget = addDisplayWidget(node, "foundry_rows", this.root, () => this.height(), () => this.height());
    this.render();
  }

  get rows() {
    return parseRows(this.text.value);
  }

  height() {
    const n = this.rows.length;
    return 30 + (n ? 14 + n * ROW_PX : 0);
  }

  write(rows) {
    this.text.value = rows.length ? JSON.stringify(rows) : "";
    this.text.callback?.(this.text.value);
    this.render();
    fitNode(this.node);
    this.node.graph?.setDirtyCanvas(true, true);
  }

  update(index, changes) {
    const rows = this.rows;
    rows[index] = { ...rows[index], ...changes };
    this.write(rows);
  }

  render() {
    const rows = this.rows;
    const choices = loraChoices(this.node);
    const parts = [];
    if (rows.length) {
      parts.push(
        el("div", { className: "lf-head" }, [
          el("span", { textContent: "LoRA" }),
          el("span", { className: "lf-num", textContent: "model" }),
          el("span", { className: "lf-num", textContent: "clip" }),
          el("span", { className: "lf-bw", textContent: "blocks" }),
          el("span", { className: "lf-x" }),
        ])
      );
    }
    rows.forEach((row, i) => {
      const on = el("input", { type: "checkbox", checked: row.on !== false, title: "on/off" });
      on.addEventListener("change", () => this.update(i, { on: on.checked }));
      const blocks = el("input", {
        type: "text",
        value: row.block_weights ?? "",
        placeholder: "all",
        title: "block weights: a preset, a vector, or 'in=0.5, mid=1, out=0.8'",
      });
      blocks.addEventListener("change", () => this.update(i, { block_weights: blocks.value.trim() }));
      const remove = el("button", { textContent: "✕", title: "remove this row" });
      remove.addEventListener("click", () => this.write(this.rows.filter((_, j) => j !== i)));
      parts.push(
        el("div", { className: row.on === false ? "lf-row lf-off" : "lf-row" }, [
          on,
          loraSelect(choices, row.lora, (lora) => this.update(i, { lora })),
          numberInput(row.strength_model, "strength on the model", (v) => this.update(i, { strength_model: v })),
          numberInput(row.strength_clip, "strength on the text encoder", (v) => this.update(i, { strength_clip: v })),
          blocks,
          remove,
        ])
      );
    });
    const add = el("button", {
      className: "lf-add",
      textContent: choices.length ? "+ add LoRA" : "no LoRAs in models/loras",
      disabled: !choices.length,
    });
    add.addEventListener("click", () => this.write([...this.rows, newRow(choices[0])]));
    parts.push(add);
    this.root.replaceChildren(...parts);
  }
}

app.registerExtension({
  name: "LoraFoundry.StackRows",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE.STACK) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      if (!this.widgets?.some((w) => w.name === ROWS)) return; // an older node without the input
      this.__lfRows = new RowsEditor(this);
      this.setSize([Math.max(this.size[0], MIN_WIDTH), this.size[1]]);
      fitNode(this);
    });
    // Loading a workflow sets the hidden widget's value after the node was created.
    chain(nodeType.prototype, "onConfigure", function () {
      this.__lfRows?.render();
    });
    // Refreshing the node definitions (R, or a new LoRA written by this pack) calls this before it
    // updates the slot combos; the row pickers are redrawn once the new lists are in place.
    chain(nodeType.prototype, "refreshComboInNode", function () {
      setTimeout(() => this.__lfRows?.render(), 0);
    });
  },
});
