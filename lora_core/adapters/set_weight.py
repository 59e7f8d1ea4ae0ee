"""``.set_weight``: the weight replaced by the file's tensor (ComfyUI ignores strength for it, and so do we)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Built, Bypass, Keys, Kind, Shape
from .bounds import whole_tensor


@dataclass(frozen=True, eq=False)
class SetAdapter:
    """``.set_weight``: replaces the weight; ComfyUI ignores strength for it, and so do we."""

    weight: Tensor


def build(keys: Keys, t) -> Built | None:
    if "set_weight" not in keys:
        return None
    return Built(SetAdapter(t[keys["set_weight"]]), [keys["set_weight"]], "set_weight")


def apply(a: SetAdapter, weight: Tensor, strength: float) -> Tensor:
    return a.weight.to(device=weight.device, dtype=weight.dtype, copy=True)


def fit_error(a: SetAdapter, shape: Shape) -> str | None:
    ok = tuple(a.weight.shape) == shape
    return None if ok else f"set_weight {tuple(a.weight.shape)} vs weight {shape}"


KIND = Kind(
    name="set_weight",
    record=SetAdapter,
    family="set",
    suffixes={".set_weight": "set_weight"},
    build=build,
    apply=apply,
    fit_error=fit_error,
    precedence=0,
    bypass=Bypass("set_weight", weight_dependent=True),
    extreme=whole_tensor("weight", scaled=False),  # ComfyUI ignores strength for it
    takes_extras=False,
    matrix_factors=False,
)
