"""How large a kind's change can get: the cheap bounds and exact peaks the overflow check reads.

Each plain-sum kind (and set_weight) names its own in its ``Extreme`` record; apply/extremes.py
loops over the registry and caches the figures. All in float64, so a factor near float16's largest
value does not overflow the bound itself.
"""

from __future__ import annotations

from torch import Tensor

from .base import Extreme, Shape

ROWS_PER_CHUNK = 4096  # the exact change of a large LoRA is taken in slices of rows, not all at once


def max_row_norm(t: Tensor) -> float:
    return float(t.double().flatten(1).norm(dim=1).max()) if t.numel() else 0.0


def max_col_norm(t: Tensor) -> float:
    return float(t.double().flatten(1).norm(dim=0).max()) if t.numel() else 0.0


def product_bound(a: Tensor, b: Tensor) -> float:
    """Every entry of a @ b is at most (largest row norm of a) x (largest column norm of b)."""
    return max_row_norm(a) * max_col_norm(b)


def largest(t: Tensor) -> float:
    return float(t.double().abs().max()) if t.numel() else 0.0


def whole_tensor(field: str, scaled: bool = True) -> Extreme:
    """The Extreme of a kind whose change is the stored tensor ``field`` (full diff, set_weight):
    bound and peak are its largest entry."""

    def peak(adapter, shape: Shape | None = None) -> float:
        return largest(getattr(adapter, field))

    return Extreme(bound=peak, peak=peak, shape_free=lambda adapter: True, scaled=scaled)
