"""LyCORIS GLoRA: change = alpha/rank * (W @ a1 @ a2 + b1 @ b2), in either of its two layouts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Built, Bypass, Keys, Kind, Shape, f32, in_float32
from .dora import dora_error, weight_decompose

_PARTS = ("a1", "a2", "b1", "b2")


@dataclass(frozen=True, eq=False)
class GloraAdapter:
    """LyCORIS GLoRA: change = alpha/rank * (W @ a1 @ a2 + b1 @ b2) (the older layout: b2 @ b1 +
    W @ a2 @ a1), told apart by the factors' shapes as ComfyUI does. Depends on the weight itself."""

    a1: Tensor
    a2: Tensor
    b1: Tensor
    b2: Tensor
    alpha: float | None = None
    dora_scale: Tensor | None = None


def build(keys: Keys, t) -> Built | None:
    used = [keys.get(r) for r in _PARTS]
    if not all(used):
        return None
    return Built(GloraAdapter(*(t[k] for k in used)), used, "LyCORIS GLoRA")


def _changed(weight: Tensor, adapter: GloraAdapter, strength: float) -> Tensor:
    """GLoRA as ComfyUI's GLoRAAdapter computes it (float32), layout and rank read from the shapes."""
    s0, s1, s2, s3 = (tuple(t.shape) for t in (adapter.a1, adapter.a2, adapter.b1, adapter.b2))
    old, rank = False, None
    if s3[1] == s2[0] == s0[0] == s1[1]:
        old, rank = True, s0[0]
    if s3[0] == s2[1] == s0[1] == s1[0] and not (old and s1[0] == weight.shape[0] == weight.shape[1]):
        old, rank = False, s1[0]
    if rank is None:
        raise ValueError(f"GLoRA factors {s0}, {s1}, {s2}, {s3} do not fit together")
    a1, a2, b1, b2 = (
        f32(t, weight.device).flatten(start_dim=1) for t in (adapter.a1, adapter.a2, adapter.b1, adapter.b2)
    )
    if old:
        change = (b2 @ b1 + weight.flatten(start_dim=1) @ a2 @ a1).reshape(weight.shape)
    elif weight.dim() > 2:
        inner = torch.einsum("o i ..., i j -> o j ...", weight, a1)
        change = torch.einsum("o i ..., i j -> o j ...", inner, a2).reshape(weight.shape)
        change = change + (b1 @ b2).reshape(weight.shape)
    else:
        change = (weight @ a1 @ a2 + b1 @ b2).reshape(weight.shape)
    alpha = 1.0 if adapter.alpha is None else adapter.alpha / rank
    if adapter.dora_scale is not None:
        return weight_decompose(weight, alpha * change, adapter.dora_scale, strength)
    return weight + strength * alpha * change


def apply(a: GloraAdapter, weight: Tensor, strength: float) -> Tensor:
    return in_float32(weight, lambda w: _changed(w, a, strength))


def fit_error(a: GloraAdapter, shape: Shape) -> str | None:
    """A dry run of the whole change on 'meta' (the layout is read from the shapes, as in apply)."""
    try:
        on_meta = GloraAdapter(*(t.to("meta") for t in (a.a1, a.a2, a.b1, a.b2)), a.alpha)
        apply(on_meta, torch.empty(shape, device="meta"), 1.0)
    except (ValueError, RuntimeError) as e:
        return f"GLoRA: {e}"
    return dora_error(a, shape)


KIND = Kind(
    name="GLoRA",
    record=GloraAdapter,
    family="glora",
    suffixes={f".{n}.weight": n for n in _PARTS},
    build=build,
    apply=apply,
    fit_error=fit_error,
    precedence=5,
    bypass=Bypass("GLoRA", weight_dependent=True),
    extreme=None,  # the change depends on the weight
)
