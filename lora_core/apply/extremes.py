"""Modules whose change is larger than a model's weights can hold, for the Load LoRA report.

A file can hold finite factors whose product is not (fp16 factors of 60000 give changes of
billions): the patched weight overflows and images come out black, with no error anywhere. The
largest change of each module is bounded first from its factors' norms (cheap); only a module
whose bound is over the limit has its change computed, to name it with the real figure.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..adapters import (
    Adapter,
    DiffAdapter,
    LohaAdapter,
    LokrAdapter,
    LoraAdapter,
    SetAdapter,
    delta,
    is_linear,
    scale_of,
)

HALF_MAX = float(torch.finfo(torch.float16).max)  # 65504: trained LoRAs change weights by ~1 at most
_ROWS_PER_CHUNK = 4096  # the exact change of a large LoRA is taken in slices of rows, not all at once

_BOUNDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # adapter -> bound at strength 1
_PEAKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # adapter -> {shape: largest change}


@dataclass(frozen=True)
class Limit:
    """The largest change a weight may take, and why."""

    value: float
    why: str  # "the model's float8_e4m3fn weights hold at most 448"


def limit_for(dtype: torch.dtype | None) -> Limit:
    """The limit for weights of ``dtype``: what the dtype holds, and never above float16's largest
    value (a weight changed by more overflows wherever ComfyUI computes in half precision)."""
    if dtype is not None and dtype.is_floating_point and float(torch.finfo(dtype).max) < HALF_MAX:
        name = str(dtype).removeprefix("torch.")
        return Limit(
            float(torch.finfo(dtype).max),
            f"the model's {name} weights hold at most {torch.finfo(dtype).max:g}",
        )
    return Limit(HALF_MAX, f"{HALF_MAX:g}, the largest float16 value")


def _max_row_norm(t: Tensor) -> float:
    return float(t.double().flatten(1).norm(dim=1).max()) if t.numel() else 0.0


def _max_col_norm(t: Tensor) -> float:
    return float(t.double().flatten(1).norm(dim=0).max()) if t.numel() else 0.0


def _product_bound(a: Tensor, b: Tensor) -> float:
    """Every entry of a @ b is at most (largest row norm of a) x (largest column norm of b)."""
    return _max_row_norm(a) * _max_col_norm(b)


def _largest(t: Tensor) -> float:
    return float(t.double().abs().max()) if t.numel() else 0.0


def change_bound(adapter: Adapter) -> float | None:
    """An upper bound on the largest change of one weight entry at strength 1, or None when the
    change depends on the weight itself (OFT, GLoRA, (IA)3, DoRA...) or the layout has no cheap one."""
    if adapter in _BOUNDS:
        return _BOUNDS[adapter]
    bound = _bound(adapter)
    _BOUNDS[adapter] = bound
    return bound


def _bound(a: Adapter) -> float | None:
    if isinstance(a, SetAdapter):
        return _largest(a.weight)
    if isinstance(a, DiffAdapter):
        return _largest(a.diff)
    scale = abs(scale_of(a))
    if isinstance(a, LoraAdapter):
        if a.mid is not None:
            return None
        return scale * _product_bound(a.up, a.down)
    if isinstance(a, LohaAdapter) and a.t1 is None:
        return scale * _product_bound(a.w1_a, a.w1_b) * _product_bound(a.w2_a, a.w2_b)
    if isinstance(a, LokrAdapter) and a.t2 is None:
        w1 = _largest(a.w1) if a.w1 is not None else _product_bound(a.w1_a, a.w1_b)
        w2 = _largest(a.w2) if a.w2 is not None else _product_bound(a.w2_a, a.w2_b)
        return scale * w1 * w2  # the largest entry of kron(w1, w2) is the product of theirs
    return None


def _shape_free(adapter: Adapter) -> bool:
    """Whether the change can be computed without the weight's shape."""
    if isinstance(adapter, LoraAdapter):
        return adapter.mid is None
    return isinstance(adapter, (SetAdapter, DiffAdapter))


def peak_change(adapter: Adapter, shape: tuple[int, ...] | None) -> float:
    """The largest change of one entry at strength 1 (inf when it overflows float32), computed;
    ``shape`` (the weight's) is needed only for LoHa, LoKr and Tucker LoRA."""
    peaks = _PEAKS.setdefault(adapter, {})
    if shape not in peaks:
        peaks[shape] = _peak(adapter, shape)
    return peaks[shape]


def _peak(adapter: Adapter, shape: tuple[int, ...] | None) -> float:
    if isinstance(adapter, SetAdapter):
        return _largest(adapter.weight)
    if isinstance(adapter, DiffAdapter):
        return _largest(adapter.diff)
    if isinstance(adapter, LoraAdapter) and adapter.mid is None:
        up, down = adapter.up.flatten(1).float(), adapter.down.flatten(1).float()
        scale = abs(scale_of(adapter))
        return max(float((rows @ down).abs().max()) * scale for rows in up.split(_ROWS_PER_CHUNK))
    return float(delta(adapter, shape).abs().max())


def extreme_changes(
    modules: Iterable[tuple[str, Adapter, float, tuple[int, ...] | None]], limit: Limit
) -> list[tuple[str, float]]:
    """(module name, largest change at its strength) for each module, of (name, adapter, strength,
    weight shape or None), whose change is over ``limit``. Modules whose change depends on the
    weight itself (DoRA, OFT, GLoRA, (IA)3) are not judged."""
    out: list[tuple[str, float]] = []
    for name, adapter, strength, shape in modules:
        if strength == 0.0 or not (is_linear(adapter) or isinstance(adapter, SetAdapter)):
            continue
        if getattr(adapter, "reshape", None) is not None or (shape is None and not _shape_free(adapter)):
            continue
        bound = change_bound(adapter)
        if bound is not None and bound * abs(strength) <= limit.value:
            continue
        # SetAdapter replaces the weight: its strength does not scale it (as in ComfyUI)
        peak = peak_change(adapter, shape) * (1.0 if isinstance(adapter, SetAdapter) else abs(strength))
        if not peak <= limit.value:  # NaN and Inf included
            out.append((name, peak))
    return out


def extreme_note(found: list[tuple[str, float]], limit: Limit) -> str:
    name, peak = max(found, key=lambda f: f[1] if math.isfinite(f[1]) else math.inf)
    many = f"{len(found)} modules change their weights" if len(found) > 1 else "a module changes its weight"
    return (
        f"{many} by more than {limit.why} (e.g. {name} by up to {peak:.3g}): the patched weights "
        "overflow and images come out black or broken. The file is damaged or the strength far too "
        "high: lower the strength or download the file again"
    )
