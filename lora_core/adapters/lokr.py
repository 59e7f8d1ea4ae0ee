"""LyCORIS LoKr: delta = scale * kron(w1, w2); w1 and w2 are full or factorised (a @ b)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Built, Bypass, Extreme, Keys, alpha_over_rank, f32
from .bounds import largest, product_bound
from .dora import summed_kind

_PARTS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")


@dataclass(frozen=True, eq=False)
class LokrAdapter:
    """LyCORIS LoKr: delta = scale * kron(w1, w2); w1 and w2 are full or factorised (a @ b)."""

    w1: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t2: Tensor | None = None
    alpha: float | None = None
    dora_scale: Tensor | None = None

    def __post_init__(self) -> None:
        if self.w1 is None and (self.w1_a is None or self.w1_b is None):
            raise ValueError("LoKr needs lokr_w1, or both lokr_w1_a and lokr_w1_b")
        if self.w2 is None and (self.w2_a is None or self.w2_b is None):
            raise ValueError("LoKr needs lokr_w2, or both lokr_w2_a and lokr_w2_b")

    @property
    def factor_rank(self) -> int | None:
        """Rank that alpha divides, or None when both factors are full (then alpha is ignored).

        ComfyUI (like LyCORIS) takes w2's rank when w2 is factorised, else w1's.
        """
        if self.w2 is None:
            return int(self.w2_b.shape[0])
        if self.w1 is None:
            return int(self.w1_b.shape[0])
        return None


def build(keys: Keys, t) -> Built | None:
    k = {role[len("lokr_") :]: key for role, key in keys.items() if role.startswith("lokr_")}
    w1_ok = "w1" in k or ("w1_a" in k and "w1_b" in k)
    w2_ok = "w2" in k or ("w2_a" in k and "w2_b" in k)
    if not (w1_ok and w2_ok):
        return None
    # A full factor wins over its a/b pair, as in ComfyUI; the pair is then left unused.
    roles = ["w1"] if "w1" in k else ["w1_a", "w1_b"]
    roles += ["w2"] if "w2" in k else ["w2_a", "w2_b"] + (["t2"] if "t2" in k else [])
    return Built(LokrAdapter(**{r: t[k[r]] for r in roles}), [k[r] for r in roles], "LyCORIS LoKr")


def rank(a: LokrAdapter) -> int | None:
    return a.factor_rank


def product(a: LokrAdapter, device: torch.device) -> Tensor:
    """kron(w1, w2) in float32, each factor rebuilt from its pair (and w2's Tucker core) where it is
    factorised; before alpha / rank."""
    w1 = f32(a.w1, device) if a.w1 is not None else f32(a.w1_a, device) @ f32(a.w1_b, device)
    if a.w2 is not None:
        w2 = f32(a.w2, device)
    elif a.t2 is not None:
        w2 = torch.einsum(
            "i j k l, j r, i p -> p r k l", f32(a.t2, device), f32(a.w2_b, device), f32(a.w2_a, device)
        )
    else:
        w2 = f32(a.w2_a, device) @ f32(a.w2_b, device)
    if w2.dim() == 4 and w1.dim() == 2:
        w1 = w1[:, :, None, None]  # kron of a matrix with a conv kernel keeps the kernel size
    return torch.kron(w1.contiguous(), w2.contiguous())


def change_bound(a: LokrAdapter) -> float | None:
    """The largest entry of kron(w1, w2) is the product of theirs (not Tucker)."""
    if a.t2 is not None:
        return None
    w1 = largest(a.w1) if a.w1 is not None else product_bound(a.w1_a, a.w1_b)
    w2 = largest(a.w2) if a.w2 is not None else product_bound(a.w2_a, a.w2_b)
    return abs(alpha_over_rank(a.alpha, a.factor_rank)) * w1 * w2


KIND = summed_kind(
    product,
    rank,
    name="LoKr",
    record=LokrAdapter,
    family="lokr",
    suffixes={f".lokr_{n}": f"lokr_{n}" for n in _PARTS},
    build=build,
    precedence=4,
    bypass=Bypass("LoKr"),
    extreme=Extreme(change_bound),
)
