"""Full differences (``.diff``, ``.w_norm``): the weight becomes weight + strength * diff."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Built, Bypass, Keys, Kind, Shape, dry_run_error, f32
from .bounds import whole_tensor


@dataclass(frozen=True, eq=False)
class DiffAdapter:
    """A full difference added as ``weight + strength * diff`` (``.diff``, ``.diff_b``, ``.w_norm``)."""

    diff: Tensor


def build(keys: Keys, t) -> Built | None:
    for role in ("diff", "w_norm"):
        if role in keys:
            return Built(DiffAdapter(t[keys[role]]), [keys[role]], "full diff")
    return None


def delta(a: DiffAdapter, shape: Shape, device: torch.device) -> Tensor:
    if tuple(a.diff.shape) != shape:
        raise ValueError(f"diff has shape {tuple(a.diff.shape)} but the target weight is {shape}")
    return f32(a.diff, device)


def apply(a: DiffAdapter, weight: Tensor, strength: float) -> Tensor:
    if strength == 0.0:
        return weight.clone()
    w32 = weight.to(dtype=torch.float32, copy=True)
    return (w32 + strength * delta(a, tuple(weight.shape), weight.device)).to(weight.dtype)


def fit_error(a: DiffAdapter, shape: Shape) -> str | None:
    return dry_run_error(delta, a, shape)


KIND = Kind(
    name="full diff",
    record=DiffAdapter,
    family="diff",
    suffixes={".diff": "diff", ".w_norm": "w_norm"},
    build=build,
    apply=apply,
    fit_error=fit_error,
    precedence=1,
    bypass=Bypass("full diff", changes_bias=True),
    extreme=whole_tensor("diff"),
    delta=delta,
    takes_extras=False,
    matrix_factors=False,
)
