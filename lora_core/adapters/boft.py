"""LyCORIS butterfly OFT (BOFT): rounds of block-diagonal rotations that together mix every row."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Built, Bypass, Keys, Kind, Shape, f32, in_float32
from .dora import dora_error, weight_decompose
from .oft import SUFFIXES
from .rotation import bounded, cayley, skew


@dataclass(frozen=True, eq=False)
class BoftAdapter:
    """LyCORIS butterfly OFT: ``levels`` rounds of block-diagonal rotations (Cayley transforms, as in
    OFT), each round pairing rows ``2**i * block_size / 2`` apart, so the product mixes every row
    with every other one; then ``rescale`` (one factor per row) if the file has it."""

    blocks: Tensor  # (levels, block_num, block_size, block_size); block_num * block_size = rows
    rescale: Tensor | None = None
    alpha: float | None = None
    dora_scale: Tensor | None = None


def build(keys: Keys, t) -> Built | None:
    blocks = keys.get("oft_blocks")
    if blocks is None or t[blocks].dim() != 4:  # (levels, blocks, size, size)
        return None
    rescale = keys.get("rescale")
    used = [blocks] + ([rescale] if rescale else [])
    return Built(BoftAdapter(t[blocks], t[rescale] if rescale else None), used, "LyCORIS BOFT")


def boft_fit_error(blocks_shape: Shape, rows: int) -> str | None:
    """Why butterfly blocks of ``blocks_shape`` cannot turn a weight with ``rows`` rows, or None."""
    if len(blocks_shape) != 4 or blocks_shape[2] != blocks_shape[3] or blocks_shape[2] % 2:
        return f"BOFT blocks {tuple(blocks_shape)} are not (levels, blocks, size, size) with an even size"
    levels, num, size = blocks_shape[:3]
    if num * size != rows or rows % (size << (levels - 1)):
        return f"BOFT blocks {tuple(blocks_shape)} do not cover the weight's {rows} rows"
    return None


def _butterfly(weight: Tensor, rotations: Tensor) -> Tensor:
    """``weight`` with its rows turned by every level of ``rotations`` in turn.

    Level i pairs row j with row j + k (k = 2**i * size / 2) inside each run of 2k rows; the
    rows so interleaved are cut into blocks of ``size`` and each block is multiplied by its
    rotation, then the interleaving is undone."""
    levels, num, size = rotations.shape[:3]
    rows, tail = weight.shape[0], tuple(weight.shape[1:])
    x = weight
    for i in range(levels):
        k = (size // 2) << i
        x = x.reshape(rows // (2 * k), 2, k, *tail).transpose(1, 2).reshape(num, size, *tail)
        x = torch.einsum("b i j, b j ... -> b i ...", rotations[i], x)
        x = x.reshape(rows // (2 * k), k, 2, *tail).transpose(1, 2).reshape(rows, *tail)
    return x


def _turn(weight: Tensor, adapter: BoftAdapter, strength: float) -> Tensor:
    """Butterfly OFT as ComfyUI's BOFTAdapter computes it (float32); same quirks as OFT's."""
    error = boft_fit_error(tuple(adapter.blocks.shape), weight.shape[0])
    if error:
        raise ValueError(error)
    blocks = f32(adapter.blocks, weight.device)
    eye = torch.eye(blocks.shape[2], device=weight.device, dtype=torch.float32)
    # A file without alpha: no bound, as in OFT (ComfyUI core fails on it and skips the module).
    alpha = adapter.alpha or 0.0
    rotations = cayley(bounded(skew(blocks), alpha), eye)
    if strength != 1.0:  # each level is pulled toward the identity ...
        rotations = strength * rotations + (1.0 - strength) * eye
    turned = _butterfly(weight, rotations)
    if adapter.rescale is not None:
        turned = turned * f32(adapter.rescale, weight.device)
    change = turned - weight
    if adapter.dora_scale is not None:
        return weight_decompose(weight, alpha * change, adapter.dora_scale, strength)
    # ... and, as ComfyUI does (kept so results match core), the change is scaled by it again.
    return weight + strength * change


def apply(a: BoftAdapter, weight: Tensor, strength: float) -> Tensor:
    return in_float32(weight, lambda w: _turn(w, a, strength))


def fit_error(a: BoftAdapter, shape: Shape) -> str | None:
    error = boft_fit_error(tuple(a.blocks.shape), shape[0])
    if error is None and a.rescale is not None:
        try:
            fits = torch.broadcast_shapes(tuple(a.rescale.shape), shape) == torch.Size(shape)
        except RuntimeError:
            fits = False
        if not fits:
            error = f"BOFT rescale {tuple(a.rescale.shape)} does not fit the weight {shape}"
    return error or dora_error(a, shape)


KIND = Kind(
    name="BOFT",
    record=BoftAdapter,
    family="oft",
    suffixes=SUFFIXES,
    build=build,
    apply=apply,
    fit_error=fit_error,
    precedence=7,
    bypass=Bypass("BOFT", weight_dependent=True),
    extreme=None,  # the change depends on the weight
)
