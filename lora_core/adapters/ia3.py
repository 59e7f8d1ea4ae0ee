"""LyCORIS (IA)^3: the weight scaled by one factor per input column or per output row."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import FIX, BadLayout, Built, Bypass, Keys, Kind, Shape, f32, in_float32

# The vector itself is the module's bare ".weight", told apart by an ".on_input" beside it: parsing
# files it under this role.
VECTOR_ROLE = "ia3_weight"


@dataclass(frozen=True, eq=False)
class Ia3Adapter:
    """LyCORIS (IA)^3: the weight scaled by ``1 + strength * w``, one factor per input column
    (``on_input``) or per output row. Depends on the weight itself. No alpha or DoRA applies; the
    fields are there because every parsed adapter carries them."""

    weight: Tensor  # (n,) or (1, n, 1, 1): n = the weight's inputs or outputs
    on_input: bool
    alpha: float | None = None
    dora_scale: Tensor | None = None


def build(keys: Keys, t) -> Built | None:
    if VECTOR_ROLE not in keys or "on_input" not in keys:
        return None
    flag = t[keys["on_input"]].flatten()
    if flag.numel() != 1 or flag.is_complex():
        raise BadLayout(f"'{keys['on_input']}' should be one flag, got {flag.numel()} values; {FIX}")
    used = [keys[VECTOR_ROLE], keys["on_input"]]
    return Built(Ia3Adapter(t[keys[VECTOR_ROLE]], bool(flag[0].item())), used, "LyCORIS (IA)3")


def ia3_fit_error(adapter: Ia3Adapter, shape: Shape) -> str | None:
    """Why an (IA)^3 vector cannot scale a weight of ``shape``, or None."""
    axis = 1 if adapter.on_input else 0
    if len(shape) < 2 or adapter.weight.numel() != shape[axis]:
        side = "inputs" if adapter.on_input else "outputs"
        return f"(IA)3 vector of {adapter.weight.numel()} does not fit the weight {tuple(shape)}'s {side}"
    if adapter.dora_scale is not None:
        return "(IA)3 with dora_scale is not a known layout"
    return None


def _scaled(weight: Tensor, adapter: Ia3Adapter, strength: float) -> Tensor:
    """W * (1 + strength * w), w along the input or the output axis, as LyCORIS's IA3 module merges."""
    error = ia3_fit_error(adapter, tuple(weight.shape))
    if error:
        raise ValueError(error)
    axis = 1 if adapter.on_input else 0
    shape = [1] * weight.dim()
    shape[axis] = -1
    return weight * (1.0 + strength * f32(adapter.weight, weight.device).reshape(shape))


def apply(a: Ia3Adapter, weight: Tensor, strength: float) -> Tensor:
    return in_float32(weight, lambda w: _scaled(w, a, strength))


def channel_factor(a: Ia3Adapter, strength: float, like: Tensor) -> Tensor:
    """1 + strength * w per channel, in ``like``'s device and dtype: bypass mode scales the layer's
    inputs (``on_input``) or its output minus bias by it, which is the scaled weight's output."""
    return (1.0 + strength * f32(a.weight, like.device).reshape(-1)).to(like.dtype)


KIND = Kind(
    name="(IA)3",
    record=Ia3Adapter,
    family="ia3",
    suffixes={".on_input": "on_input"},
    build=build,
    apply=apply,
    fit_error=ia3_fit_error,
    precedence=9,
    bypass=Bypass("(IA)3", channel_factor=channel_factor, on_input=lambda a: a.on_input),
    extreme=None,  # the change depends on the weight
    matrix_factors=False,
    flag_roles=frozenset({"on_input"}),
)
