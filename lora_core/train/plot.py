"""The loss-curve picture: raw loss, smoothed loss, and the learning rate on a second axis (PIL only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RAW, SMOOTH, LR, AXIS, GRID = (160, 190, 230), (20, 70, 170), (230, 120, 20), (40, 40, 40), (225, 225, 225)


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _range(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-12 else (lo, hi)


def _polyline(draw, values, box, vrange, color, width) -> None:
    left, top, right, bottom = box
    lo, hi = vrange
    n = len(values)
    points = []
    for i, v in enumerate(values):
        if not math.isfinite(v):
            continue
        x = left + (right - left) * (i / (n - 1) if n > 1 else 0.5)
        y = bottom - (bottom - top) * (v - lo) / (hi - lo)
        points.append((x, y))
    if len(points) > 1:
        draw.line(points, fill=color, width=width)
    elif points:
        x, y = points[0]
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)


def loss_curve(
    losses: Sequence[float], lrs: Sequence[float], width: int = 640, height: int = 360
) -> np.ndarray:
    """(H, W, 3) float32 in 0..1, ready to be a ComfyUI IMAGE after adding a batch dimension."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    box = (58, 28, width - 62, height - 34)
    left, top, right, bottom = box
    for k in range(5):
        y = top + (bottom - top) * k / 4
        draw.line((left, y, right, y), fill=GRID)
    draw.rectangle(box, outline=AXIS)
    lrange = _range(losses)
    if losses:
        _polyline(draw, list(losses), box, lrange, RAW, 1)
        _polyline(draw, smooth(losses), box, lrange, SMOOTH, 2)
    rrange = _range(lrs)
    if lrs:
        _polyline(draw, list(lrs), box, rrange, LR, 1)
    draw.text((left, 8), f"loss (raw, smoothed)  steps: {len(losses)}", fill=SMOOTH, font=font)
    draw.text((right - 110, 8), "learning rate", fill=LR, font=font)
    for value, y in ((lrange[1], top), (lrange[0], bottom)):
        draw.text((4, y - 6), f"{value:.4g}", fill=AXIS, font=font)
    for value, y in ((rrange[1], top), (rrange[0], bottom)):
        draw.text((right + 4, y - 6), f"{value:.2e}", fill=LR, font=font)
    draw.text((left, bottom + 8), "1", fill=AXIS, font=font)
    draw.text((right - 30, bottom + 8), f"{max(1, len(losses))}", fill=AXIS, font=font)
    draw.text(((left + right) // 2 - 12, bottom + 8), "step", fill=AXIS, font=font)
    return np.asarray(image, dtype=np.float32) / 255.0
