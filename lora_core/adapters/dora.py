"""DoRA, a variant of the other kinds: weight decomposition, in ComfyUI's reading of a kohya /
LyCORIS ``dora_scale`` and in PEFT's (``lora_magnitude_vector``, LoRA only)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .base import Kind, Shape, alpha_over_rank, dry_run_error, f32, in_float32, reshape_to

# PEFT's DoRA magnitude, beside a LoRA's factors: one per output row of the CHANGED weight.
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight",
                      ".lora_magnitude_vector.default.weight")  # fmt: skip


def weight_decompose(
    weight: Tensor, scaled: Tensor, dora_scale: Tensor, strength: float, peft: bool = False
) -> Tensor:
    """Weight decomposition as ComfyUI's ``weight_decompose`` does it, all in float32; with
    ``peft``, as PEFT merges DoRA: magnitude * (W + delta) / ||W + delta|| per output row.

    ComfyUI quirk kept on purpose (results must match core): when the magnitude lies on the
    output axis the norm is taken from the ORIGINAL weight, not from weight + delta.
    """
    merged = weight + scaled
    scale = f32(dora_scale, weight.device)
    tail = [1] * (merged.dim() - 1)
    if peft:
        scale = scale.reshape(-1, *tail)
        norm = (
            merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *tail)
            + torch.finfo(torch.float32).eps
        )
    elif scale.shape[0] == merged.shape[0]:
        norm = (
            weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *tail)
            + torch.finfo(torch.float32).eps
        )
    else:
        cols = merged.transpose(0, 1).reshape(merged.shape[1], -1)
        norm = (
            cols.norm(dim=1).reshape(merged.shape[1], *tail).transpose(0, 1) + torch.finfo(torch.float32).eps
        )
    merged = merged * (scale / norm)
    if strength != 1.0:
        return weight + strength * (merged - weight)
    return merged


def dora_error(adapter, shape: Shape) -> str | None:
    """Why the adapter's ``dora_scale`` cannot scale a weight of ``shape`` (ComfyUI's DoRA math
    needs one magnitude per output row or per input column, shaped to broadcast), or None."""
    scale = getattr(adapter, "dora_scale", None)
    if scale is None:
        return None
    weight = torch.empty(shape, device="meta")
    try:
        out = weight_decompose(
            weight, weight, scale.to("meta"), 1.0, peft=getattr(adapter, "dora_peft", False)
        )
    except (ValueError, RuntimeError, IndexError):
        out = None
    if out is None or tuple(out.shape) != tuple(shape):
        return (
            f"dora_scale {tuple(scale.shape)} does not fit the weight {shape}: it holds one magnitude per "
            "output row (shaped (rows, 1, ...)) or per input column (shaped (1, columns, ...))"
        )
    return None


def peft_dora_fit_error(adapter, shape: Shape) -> str | None:
    """Why a PEFT DoRA magnitude cannot scale a weight of ``shape``'s output rows, or None."""
    if adapter.dora_peft and adapter.dora_scale is not None and adapter.dora_scale.numel() != shape[0]:
        return (
            f"PEFT DoRA lora_magnitude_vector of {adapter.dora_scale.numel()} does not fit the weight "
            f"{tuple(shape)}'s {shape[0]} outputs"
        )
    return None


def with_dora(weight: Tensor, scaled: Tensor, adapter, strength: float) -> Tensor:
    """``weight`` changed by the plain-sum ``scaled`` at ``strength``, through DoRA when the record has it."""
    if adapter.dora_scale is not None:
        return weight_decompose(
            weight, scaled, adapter.dora_scale, strength, peft=getattr(adapter, "dora_peft", False)
        )
    return weight + strength * scaled


def summed(delta):
    """apply and fit_error of a plain-sum kind (weight + strength * delta, through DoRA when the
    record carries a magnitude), from its ``delta``."""

    def apply(adapter, weight: Tensor, strength: float) -> Tensor:
        change = delta(adapter, tuple(weight.shape), weight.device)
        return in_float32(weight, lambda w: with_dora(w, change, adapter, strength))

    def fit_error(adapter, shape: Shape) -> str | None:
        return dry_run_error(delta, adapter, shape) or dora_error(adapter, shape)

    return apply, fit_error


def summed_kind(
    product: Callable[[object, torch.device], Tensor], rank: Callable[[object], int | None], **fields
) -> Kind:
    """The Kind of a plain-sum kind whose change is alpha / rank times ``product(adapter, device)``
    (float32), reshaped to the weight (LoHa, LoKr): its delta, apply, fit_error, rank and scale;
    ``fields`` give the rest."""

    def scale(adapter) -> float:
        return alpha_over_rank(adapter.alpha, rank(adapter))

    def delta(adapter, shape: Shape, device: torch.device) -> Tensor:
        return reshape_to(product(adapter, device), shape, type(adapter).__name__) * scale(adapter)

    apply, fit_error = summed(delta)
    return Kind(delta=delta, apply=apply, fit_error=fit_error, rank=rank, scale=scale, **fields)
