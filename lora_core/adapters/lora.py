"""LoRA / LoCon (kohya, diffusers and PEFT spellings), with a Tucker ``mid``, DoRA in both forms
and a ``reshape_weight`` (Flux control LoRAs): delta = (alpha / rank) * up @ down."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import FIX, BadLayout, Built, Bypass, Extreme, Keys, Kind, Shape, dry_run_error, f32, reshape_to
from .bounds import ROWS_PER_CHUNK, product_bound
from .dora import dora_error, peft_dora_fit_error, with_dora

# Flux control LoRAs widen img_in 2x (Canny, Depth); an inpainting one would 6x. A file asking for
# more only makes the patch allocate that much.
MAX_GROWTH = 16
# The spellings of an up/down pair, in the order they are tried; "kohya" may carry a Tucker mid.
SPELLINGS = ("kohya", "AB", "ABdefault", "ABbare", "dotted", "processor", "linear_layer")
_PAIRS = {
    "kohya": (".lora_up.weight", ".lora_down.weight"),
    "AB": (".lora_B.weight", ".lora_A.weight"),
    "ABdefault": (".lora_B.default.weight", ".lora_A.default.weight"),
    "ABbare": (".lora_B", ".lora_A"),
    "dotted": (".lora.up.weight", ".lora.down.weight"),
    "processor": ("_lora.up.weight", "_lora.down.weight"),
    "linear_layer": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
}
SUFFIXES = {suffix: f"{side}:{spelling}" for spelling, pair in _PAIRS.items()
            for side, suffix in zip(("up", "down"), pair, strict=True)} | {".lora_mid.weight": "mid"}  # fmt: skip


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """Kohya LoRA / LoCon: delta = (alpha / rank) * up @ down, with an optional Tucker ``mid``."""

    up: Tensor  # (out, r) or (out, r, 1, 1)
    down: Tensor  # (r, in) or (r, in, kh, kw); with ``mid``: (r, in, 1, 1)
    alpha: float | None = None
    mid: Tensor | None = None  # (r, r, kh, kw) for Tucker-decomposed convolutions
    dora_scale: Tensor | None = None
    reshape: tuple[int, ...] | None = None  # ``.reshape_weight``: the weight is zero-padded to this first
    # ``dora_scale`` is PEFT's ``lora_magnitude_vector``: one magnitude per output row, over the
    # norm of the CHANGED weight (PEFT's DoRA), not ComfyUI's reading of a kohya ``dora_scale``.
    dora_peft: bool = False

    def __post_init__(self) -> None:
        if self.up.dim() < 2 or self.down.dim() < 2:
            raise ValueError(
                f"LoRA up/down must be at least 2-D, got {tuple(self.up.shape)} and {tuple(self.down.shape)}"
            )
        if self.up.shape[1] != self.down.shape[0]:
            raise ValueError(
                f"LoRA rank mismatch: up {tuple(self.up.shape)} has rank {self.up.shape[1]}, "
                f"down {tuple(self.down.shape)} has rank {self.down.shape[0]}; the file is inconsistent"
            )

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def build(keys: Keys, t) -> Built | None:
    for spelling in SPELLINGS:
        up, down = keys.get(f"up:{spelling}"), keys.get(f"down:{spelling}")
        if up and down:
            mid = keys.get("mid") if spelling == "kohya" else None
            used = [up, down] + ([mid] if mid else [])
            reshape = None
            if "reshape" in keys:  # the weight is first zero-padded to this shape (Flux control LoRAs)
                reshape = reshape_weight(t[keys["reshape"]], keys["reshape"])
                used.append(keys["reshape"])
            label = "kohya LoRA" if spelling == "kohya" else "diffusers"
            return Built(
                LoraAdapter(up=t[up], down=t[down], mid=t[mid] if mid else None, reshape=reshape), used, label
            )
    return None


def reshape_weight(t: Tensor, key: str) -> tuple[int, ...]:
    """The shape a ``reshape_weight`` grows the weight to: 1 to 8 whole, positive sizes."""
    values = t.flatten().tolist() if t.numel() <= 8 and not t.is_complex() else None
    if not values or any(not float(v).is_integer() or not 1 <= v < 2**31 for v in values):
        raise BadLayout(f"'{key}' should list the sizes of the weight it grows, got {t.numel()} values "
                        f"{str(values)[:60] if values else ''}; {FIX}")  # fmt: skip
    return tuple(int(v) for v in values)


def rank(a: LoraAdapter) -> int:
    return a.rank


def scale(a: LoraAdapter) -> float:
    return 1.0 if a.alpha is None else a.alpha / a.rank


def _folded_down(a: LoraAdapter, device: torch.device) -> Tensor:
    """down with a Tucker mid folded in, flattened to (r, in*k*k)."""
    down = f32(a.down, device)
    if a.mid is not None:
        mid = f32(a.mid, device)  # (r, r, kh, kw)
        down = torch.einsum("o i h w, i n -> o n h w", mid, down.flatten(start_dim=1))
    return down.flatten(start_dim=1)


def delta(a: LoraAdapter, shape: Shape, device: torch.device) -> Tensor:
    """up @ down (after folding a Tucker mid into down), scaled by alpha / rank, shaped like the weight."""
    raw = f32(a.up, device).flatten(start_dim=1) @ _folded_down(a, device)  # (out, r) @ (r, in*k*k)
    return reshape_to(raw, shape, type(a).__name__) * scale(a)


def scaled_factors(adapter: LoraAdapter) -> tuple[Tensor, Tensor]:
    """(up * scale, down) as 2-D float32, so several LoRAs can be concatenated along the rank."""
    if not isinstance(adapter, LoraAdapter) or adapter.dora_scale is not None or adapter.reshape is not None:
        raise ValueError("scaled_factors needs a plain LoraAdapter (no DoRA)")
    device = adapter.up.device
    up = f32(adapter.up, device).flatten(start_dim=1) * scale(adapter)
    return up, _folded_down(adapter, device)


def padded(weight: Tensor, shape: Shape) -> Tensor:
    """``weight`` in the top-left corner of a zero tensor of ``shape`` (a LoRA's ``reshape_weight``)."""
    shape = tuple(shape)
    if len(shape) != weight.dim() or any(n < o for n, o in zip(shape, weight.shape, strict=True)):
        raise ValueError(
            f"reshape_weight {shape} cannot hold the weight {tuple(weight.shape)}: it may only grow it"
        )
    out = weight.new_zeros(shape)
    out[tuple(slice(0, n) for n in weight.shape)] = weight
    return out


def apply(a: LoraAdapter, weight: Tensor, strength: float) -> Tensor:
    if a.reshape is not None:
        weight = padded(weight, a.reshape)
    w32 = weight.to(dtype=torch.float32, copy=True)
    return with_dora(w32, delta(a, tuple(weight.shape), weight.device), a, strength).to(weight.dtype)


def fit_error(a: LoraAdapter, shape: Shape) -> str | None:
    if a.reshape is not None:
        grown = tuple(a.reshape)
        if len(grown) != len(shape) or any(n < o for n, o in zip(grown, shape, strict=True)):
            return f"reshape_weight {grown} cannot hold the weight {shape}: it may only grow it"
        if math.prod(grown) > MAX_GROWTH * math.prod(shape):
            return (
                f"reshape_weight {grown} would make the weight {shape} more than {MAX_GROWTH} times "
                "larger; a control LoRA widens it a few times at most"
            )
        shape = grown
    if math.prod(a.up.shape[1:]) != a.rank:  # e.g. a 3-D up: no layout, and up @ down would not chain
        return (
            f"LoRA up {tuple(a.up.shape)} is not (outputs, rank) or (outputs, rank, 1, 1) for rank {a.rank}"
        )
    if a.up.shape[0] != shape[0]:
        return f"LoRA up {tuple(a.up.shape)} has {a.up.shape[0]} outputs, the weight {shape} has {shape[0]}"
    error = peft_dora_fit_error(a, shape)
    if error:
        return error
    if a.mid is None and a.dora_scale is None:  # the common case, without a dry run
        inputs = math.prod(a.down.shape[1:])
        if inputs != math.prod(shape[1:]):
            return f"LoRA down {tuple(a.down.shape)} takes {inputs} inputs, the weight {shape} has {math.prod(shape[1:])}"
        return None
    return dry_run_error(delta, a, shape) or dora_error(a, shape)


def change_bound(a: LoraAdapter) -> float | None:
    """alpha/rank times the bound on up @ down; none cheap with a Tucker mid."""
    return None if a.mid is not None else abs(scale(a)) * product_bound(a.up, a.down)


def peak_change(a: LoraAdapter, shape: Shape | None) -> float:
    """The largest entry of the change at strength 1, a slice of up's rows at a time."""
    if a.mid is not None:
        return float(delta(a, tuple(shape), torch.device("cpu")).abs().max())
    up, down = a.up.flatten(1).float(), a.down.flatten(1).float()
    return max(float((rows @ down).abs().max()) * abs(scale(a)) for rows in up.split(ROWS_PER_CHUNK))


KIND = Kind(
    name="LoRA/LoCon",
    record=LoraAdapter,
    family="lora",
    suffixes=SUFFIXES,
    build=build,
    apply=apply,
    fit_error=fit_error,
    precedence=2,
    bypass=Bypass("LoRA"),
    extreme=Extreme(change_bound, peak_change, shape_free=lambda a: a.mid is None),
    delta=delta,
    rank=rank,
    scale=scale,
)
