"""LyCORIS LoHa: delta = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), elementwise (Hadamard)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Built, Bypass, Extreme, Keys, alpha_over_rank, f32
from .bounds import product_bound
from .dora import summed_kind

_PARTS = ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")


@dataclass(frozen=True, eq=False)
class LohaAdapter:
    """LyCORIS LoHa: delta = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), elementwise (Hadamard)."""

    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    alpha: float | None = None
    t1: Tensor | None = None  # Tucker cores; with them w*_a is (r, out) and w*_b is (r, in)
    t2: Tensor | None = None
    dora_scale: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.t1 is None) != (self.t2 is None):
            raise ValueError("LoHa Tucker form needs both hada_t1 and hada_t2, got only one")

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])


def build(keys: Keys, t) -> Built | None:
    names = _PARTS[:4] + (_PARTS[4:] if "hada_t1" in keys and "hada_t2" in keys else ())
    if not all(f"hada_{n}" in keys for n in names[:4]):
        return None
    used = [keys[f"hada_{n}"] for n in names]
    return Built(LohaAdapter(**{n: t[keys[f"hada_{n}"]] for n in names}), used, "LyCORIS LoHa")


def rank(a: LohaAdapter) -> int:
    return a.rank


def product(a: LohaAdapter, device: torch.device) -> Tensor:
    """(w1_a @ w1_b) * (w2_a @ w2_b) in float32, Tucker cores folded in first; before alpha / rank."""
    if a.t1 is not None:
        rebuild = "i j k l, j r, i p -> p r k l"
        m1 = torch.einsum(rebuild, f32(a.t1, device), f32(a.w1_b, device), f32(a.w1_a, device))
        m2 = torch.einsum(rebuild, f32(a.t2, device), f32(a.w2_b, device), f32(a.w2_a, device))
    else:
        m1 = f32(a.w1_a, device) @ f32(a.w1_b, device)
        m2 = f32(a.w2_a, device) @ f32(a.w2_b, device)
    return m1 * m2


def change_bound(a: LohaAdapter) -> float | None:
    """The Hadamard product's entries are bounded by the product of both pairs' bounds (not Tucker)."""
    if a.t1 is not None:
        return None
    scale = abs(alpha_over_rank(a.alpha, a.rank))
    return scale * product_bound(a.w1_a, a.w1_b) * product_bound(a.w2_a, a.w2_b)


KIND = summed_kind(
    product,
    rank,
    name="LoHa",
    record=LohaAdapter,
    family="loha",
    suffixes={f".hada_{n}": f"hada_{n}" for n in _PARTS},
    build=build,
    precedence=3,
    bypass=Bypass("LoHa"),
    extreme=Extreme(change_bound),
)
