"""LyCORIS (diag-)OFT: the weight's rows, in blocks, turned by orthogonal matrices."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Built, Bypass, Keys, Kind, Shape, f32, in_float32
from .dora import dora_error, weight_decompose
from .rotation import bounded, cayley, skew

# Shared with BOFT, which keeps its blocks under the same suffix with one more axis.
SUFFIXES = {".oft_blocks": "oft_blocks", ".rescale": "rescale"}


@dataclass(frozen=True, eq=False)
class OftAdapter:
    """LyCORIS (diag-)OFT: the weight's rows, in blocks, turned by orthogonal matrices (Cayley
    transform of the skew part of ``blocks``); ``alpha`` > 0 bounds the norm of that skew part.
    The change depends on the weight itself, so it is never summed with others."""

    blocks: Tensor  # (block_num, block_size, block_size); block_num * block_size = the weight's rows
    alpha: float | None = None
    dora_scale: Tensor | None = None


def build(keys: Keys, t) -> Built | None:
    blocks = keys.get("oft_blocks")
    if blocks is None or t[blocks].dim() != 3:
        return None
    rescale = keys.get("rescale")
    # ComfyUI reads a diag-OFT's ``rescale`` but does not use it; it is taken here too, with the same effect.
    return Built(OftAdapter(t[blocks]), [blocks] + ([rescale] if rescale else []), "LyCORIS OFT")


def _turn(weight: Tensor, adapter: OftAdapter, strength: float) -> Tensor:
    """OFT as ComfyUI's OFTAdapter computes it (float32), block by block; see the quirk below."""
    blocks = f32(adapter.blocks, weight.device)
    num, size = blocks.shape[0], blocks.shape[1]
    if blocks.dim() != 3 or blocks.shape[2] != size or num * size != weight.shape[0]:
        raise ValueError(f"OFT blocks {tuple(blocks.shape)} do not fit a weight with {weight.shape[0]} rows")
    eye = torch.eye(size, device=weight.device, dtype=torch.float32)
    alpha = adapter.alpha or 0.0  # in OFT, alpha is a bound on the skew part's norm
    rotation = cayley(bounded(skew(blocks), alpha), eye)
    change = torch.einsum(
        "k n m, k n ... -> k m ...",
        rotation * strength - strength * eye,
        weight.view(num, size, *weight.shape[1:]),
    ).reshape(weight.shape)
    if adapter.dora_scale is not None:  # ComfyUI passes the OFT alpha (0 when absent) as DoRA's alpha
        return weight_decompose(weight, alpha * change, adapter.dora_scale, strength)
    # ComfyUI quirk kept on purpose (results must match core): the strength is applied a second
    # time here, so a plain OFT at strength s changes the weight by s^2 (R - I) W.
    return weight + strength * change


def apply(a: OftAdapter, weight: Tensor, strength: float) -> Tensor:
    return in_float32(weight, lambda w: _turn(w, a, strength))


def fit_error(a: OftAdapter, shape: Shape) -> str | None:
    num, size, size2 = a.blocks.shape
    if not (size == size2 and num * size == shape[0]):
        return f"OFT blocks {tuple(a.blocks.shape)} do not cover the weight's {shape[0]} rows"
    return dora_error(a, shape)


KIND = Kind(
    name="OFT (LyCORIS or PEFT)",
    record=OftAdapter,
    family="oft",
    suffixes=SUFFIXES,
    build=build,
    apply=apply,
    fit_error=fit_error,
    precedence=6,
    bypass=Bypass("OFT", weight_dependent=True),
    extreme=None,  # the change depends on the weight
)
