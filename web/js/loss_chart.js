// Train LoRA live chart: loss per step (raw and smoothed), step and time left, drawn on the node from
// the training events the Python node sends while it runs.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { NODE, TRAIN_EVENT, addDisplayWidget, chain, el, fitNode } from "./common.js";

const HEIGHT = 150;
const SMOOTH = 0.9; // exponential moving average weight, as TensorBoard's default smoothing

function formatTime(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

export class LossChart {
  constructor(node) {
    this.node = node;
    this.points = []; // [step, loss]
    this.last = null; // the latest event
    this.canvas = el("canvas", { className: "lf-chart" });
    this.canvas.dataset.loraFoundry = "loss-chart";
    addDisplayWidget(node, "foundry_loss_chart", this.canvas, () => HEIGHT, () => HEIGHT);
    new ResizeObserver(() => this.draw()).observe(this.canvas);
  }

  add(event) {
    const step = Number(event.step);
    if (this.last && step <= Number(this.last.step)) this.points = []; // a new run (or a resume)
    this.last = event;
    if (Number.isFinite(Number(event.loss))) this.points.push([step, Number(event.loss)]);
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const h = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== w || canvas.height !== h) Object.assign(canvas, { width: w, height: h });
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    const cw = w / ratio;
    const ch = h / ratio;
    ctx.fillStyle = "#1b1b1f";
    ctx.fillRect(0, 0, cw, ch);
    ctx.font = "11px sans-serif";
    ctx.fillStyle = "#bbb";
    ctx.fillText(this.header(), 6, 13);
    if (!this.points.length) return;
    const plot = { x: 36, y: 20, w: cw - 42, h: ch - 34 };
    const total = Math.max(Number(this.last?.total) || 0, this.points.at(-1)[0], 1);
    const losses = this.points.map((p) => p[1]);
    let lo = Math.min(...losses);
    let hi = Math.max(...losses);
    if (hi - lo < 1e-9) [lo, hi] = [lo - 0.5 * Math.abs(lo || 1), hi + 0.5 * Math.abs(hi || 1)];
    const x = (step) => plot.x + (plot.w * (step - 1)) / Math.max(total - 1, 1);
    const y = (loss) => plot.y + plot.h * (1 - (loss - lo) / (hi - lo));
    ctx.strokeStyle = "#444";
    ctx.lineWidth = 1;
    ctx.strokeRect(plot.x, plot.y, plot.w, plot.h);
    ctx.fillStyle = "#888";
    ctx.font = "9px sans-serif";
    ctx.fillText(hi.toPrecision(3), 2, plot.y + 8);
    ctx.fillText(lo.toPrecision(3), 2, plot.y + plot.h);
    ctx.fillText(`step ${total}`, plot.x + plot.w - 40, ch - 3);
    this.line(ctx, this.points, x, y, "rgba(120, 170, 255, 0.45)");
    let ema = this.points[0][1];
    const smooth = this.points.map(([s, l], i) => [s, (ema = i ? SMOOTH * ema + (1 - SMOOTH) * l : l)]);
    this.line(ctx, smooth, x, y, "#ffb347");
  }

  line(ctx, points, x, y, colour) {
    ctx.strokeStyle = colour;
    ctx.fillStyle = colour;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    points.forEach(([s, l], i) => (i ? ctx.lineTo(x(s), y(l)) : ctx.moveTo(x(s), y(l))));
    ctx.stroke();
    if (points.length === 1) ctx.fillRect(x(points[0][0]) - 2, y(points[0][1]) - 2, 4, 4);
  }

  header() {
    const e = this.last;
    if (!e) return "loss: waiting for the first step";
    const loss = Number(e.loss);
    const lr = Number(e.lr);
    return [
      `step ${e.step}/${e.total}`,
      `loss ${Number.isFinite(loss) ? loss.toFixed(4) : "?"}`,
      Number.isFinite(lr) ? `lr ${lr.toExponential(1)}` : "",
      `${formatTime(Number(e.eta_s))} left`,
    ]
      .filter(Boolean)
      .join("  ·  ");
  }
}

function onTrainEvent({ detail }) {
  if (!detail || detail.node == null) return;
  const node = app.graph?.getNodeById(detail.node) ?? app.graph?.getNodeById(Number(detail.node));
  node?.__lfLoss?.add(detail);
}

app.registerExtension({
  name: "LoraFoundry.LossChart",
  setup() {
    api.addEventListener(TRAIN_EVENT, onTrainEvent);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE.TRAIN && nodeData.name !== NODE.LAUNCH_JOB) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      this.__lfLoss = new LossChart(this);
      fitNode(this);
    });
  },
});
