// Shared by the pack's extensions: node ids, the names the Python side also uses, and a text panel widget.
// ComfyUI loads every .js file under web/ as an extension; this one only exports.

// Node ids, as registered in nodes/__init__.py (never renamed after release).
export const NODE = {
  LOAD: "LoraFoundry_LoadLora",
  LOAD_MODEL_ONLY: "LoraFoundry_LoadLoraModelOnly",
  STACK: "LoraFoundry_LoraStack",
  APPLY_STACK: "LoraFoundry_ApplyLoraStack",
  TRAIN: "LoraFoundry_TrainLora",
  LAUNCH_JOB: "LoraFoundry_LaunchTrainJob",
  CAPTION: "LoraFoundry_CaptionDataset",
};
export const PACK_PREFIX = "LoraFoundry_";

// The LoRA Stack node's JSON input and its row fields: lora_core/apply/stack.py ROWS and ROW_FIELDS.
export const ROWS = "rows_json";
export const ROW_FIELDS = ["lora", "on", "strength_model", "strength_clip", "block_weights"];

// The ui key of nodes that wrote a new LoRA file (Merge, Resize, Train): nodes/comfy_bridge.py LORA_WRITTEN.
export const LORA_WRITTEN = "lora_written";

// Live training progress sent by Train LoRA and Launch Train Job: nodes/comfy_bridge_train.py TRAIN_EVENT.
export const TRAIN_EVENT = "lora_foundry.train";

const STYLE_ID = "lora-foundry-style";
const CSS = `
.lf-panel { box-sizing: border-box; width: 100%; height: 100%; overflow: auto; padding: 4px 6px;
  font: 11px/1.35 ui-monospace, Menlo, Consolas, monospace; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #444); border-radius: 6px; }
.lf-panel .lf-triggers { font-family: sans-serif; font-size: 12px; margin-bottom: 4px; }
.lf-panel .lf-chip { display: inline-block; margin: 1px 3px 1px 0; padding: 0 6px; border-radius: 8px;
  background: #3a5f8a; color: #fff; cursor: copy; }
.lf-panel pre { margin: 0; white-space: pre-wrap; word-break: break-word; font: inherit; }
.lf-panel .lf-caption { border-top: 1px solid var(--border-color, #444); padding: 2px 0; }
.lf-rows { box-sizing: border-box; width: 100%; font: 12px sans-serif; color: var(--input-text, #ddd); }
.lf-row { display: flex; align-items: center; gap: 4px; margin: 2px 0; }
.lf-row.lf-off { opacity: 0.5; }
.lf-row select, .lf-row input[type=number], .lf-row input[type=text] { box-sizing: border-box; height: 22px;
  background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd);
  border: 1px solid var(--border-color, #444); border-radius: 4px; font-size: 11px; }
.lf-row select { flex: 1 1 auto; min-width: 60px; }
.lf-row input[type=number] { width: 52px; flex: none; }
.lf-row input[type=text] { width: 58px; flex: none; }
.lf-row button, .lf-rows .lf-add { height: 22px; background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd);
  border: 1px solid var(--border-color, #444); border-radius: 4px; cursor: pointer; font-size: 11px; }
.lf-rows .lf-head { display: flex; gap: 4px; color: var(--descrip-text, #999); font-size: 10px; padding-left: 22px; }
.lf-rows .lf-head span:first-child { flex: 1 1 auto; }
.lf-rows .lf-head span.lf-num { width: 52px; flex: none; }
.lf-rows .lf-head span.lf-bw { width: 58px; flex: none; }
.lf-rows .lf-head span.lf-x { width: 24px; flex: none; }
.lf-rows .lf-add { width: 100%; margin-top: 2px; }
.lf-chart { width: 100%; height: 100%; display: block; border-radius: 6px; }
`;

export function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.append(style);
}

export function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

/** A DOM widget that is shown on the node but never saved in the workflow or sent in the prompt. */
export function addDisplayWidget(node, name, element, getMinHeight, getMaxHeight) {
  ensureStyle();
  const widget = node.addDOMWidget(name, "lora_foundry_display", element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight,
    getMaxHeight,
  });
  widget.serialize = false; // not in widgets_values either
  return widget;
}

/** Grows the node so that its widgets fit, keeping a width the user made larger. */
export function fitNode(node) {
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  node.setDirtyCanvas(true, true);
}

/** Chains a prototype method: the original runs first. */
export function chain(proto, method, fn) {
  const original = proto[method];
  proto[method] = function () {
    const result = original?.apply(this, arguments);
    fn.apply(this, arguments);
    return result;
  };
}
