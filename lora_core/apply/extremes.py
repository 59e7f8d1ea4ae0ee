"""Modules whose change is larger than a model's weights can hold, for the Load LoRA report.

A file can hold finite factors whose product is not (fp16 factors of 60000 give changes of
billions): the patched weight overflows and images come out black, with no error anywhere. The
largest change of each module is bounded first from its factors' norms (cheap); only a module
whose bound is over the limit has its change computed, to name it with the real figure. Each
kind states its bound and peak in its own module (``KIND.extreme``); this module only loops and caches.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..adapters import Adapter, delta, kind_of

HALF_MAX = float(torch.finfo(torch.float16).max)  # 65504: trained LoRAs change weights by ~1 at most

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


def change_bound(adapter: Adapter) -> float | None:
    """An upper bound on the largest change of one weight entry at strength 1, or None when the
    change depends on the weight itself (OFT, GLoRA, (IA)3, DoRA...) or the layout has no cheap one."""
    if adapter in _BOUNDS:
        return _BOUNDS[adapter]
    bound = _bound(adapter)
    _BOUNDS[adapter] = bound
    return bound


def _bound(adapter: Adapter) -> float | None:
    extreme = kind_of(adapter).extreme
    return None if extreme is None else extreme.bound(adapter)


def _shape_free(adapter: Adapter) -> bool:
    """Whether the change can be computed without the weight's shape."""
    extreme = kind_of(adapter).extreme
    return extreme is not None and extreme.shape_free(adapter)


def peak_change(adapter: Adapter, shape: tuple[int, ...] | None) -> float:
    """The largest change of one entry at strength 1 (inf when it overflows float32), computed;
    ``shape`` (the weight's) is needed only for LoHa, LoKr and Tucker LoRA."""
    peaks = _PEAKS.setdefault(adapter, {})
    if shape not in peaks:
        peaks[shape] = _peak(adapter, shape)
    return peaks[shape]


def _peak(adapter: Adapter, shape: tuple[int, ...] | None) -> float:
    extreme = kind_of(adapter).extreme
    if extreme is not None and extreme.peak is not None:
        return extreme.peak(adapter, shape)
    return float(delta(adapter, shape).abs().max())


def _variant(adapter: Adapter) -> bool:
    """DoRA or a reshape: the change is no longer the kind's plain one, so it is not judged."""
    return getattr(adapter, "dora_scale", None) is not None or getattr(adapter, "reshape", None) is not None


def extreme_changes(
    modules: Iterable[tuple[str, Adapter, float, tuple[int, ...] | None]], limit: Limit
) -> list[tuple[str, float]]:
    """(module name, largest change at its strength) for each module, of (name, adapter, strength,
    weight shape or None), whose change is over ``limit``. Modules whose change depends on the
    weight itself (DoRA, OFT, GLoRA, (IA)3) are not judged."""
    out: list[tuple[str, float]] = []
    for name, adapter, strength, shape in modules:
        extreme = kind_of(adapter).extreme
        if strength == 0.0 or extreme is None or _variant(adapter):
            continue
        if shape is None and not _shape_free(adapter):
            continue
        bound = change_bound(adapter)
        if bound is not None and bound * abs(strength) <= limit.value:
            continue
        peak = peak_change(adapter, shape) * (abs(strength) if extreme.scaled else 1.0)
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
