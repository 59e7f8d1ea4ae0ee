// LoRA Foundry frontend extension: shows the Load LoRA report and trigger words on the node after a run.
import { app } from "../../scripts/app.js";

const LOADERS = new Set(["LoraFoundry_LoadLora", "LoraFoundry_LoadLoraModelOnly"]);

app.registerExtension({
  name: "LoraFoundry.Report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!LOADERS.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const report = message?.text?.[0] ?? "";
      const triggers = message?.trigger_words?.[0] ?? "";
      let widget = this.widgets?.find((w) => w.name === "foundry_report");
      if (!widget) {
        widget = this.addWidget("text", "foundry_report", "", () => {}, { serialize: false });
      }
      widget.value = (triggers ? `trigger words: ${triggers}\n` : "") + report;
      this.setDirtyCanvas(true, true);
    };
  },
});
