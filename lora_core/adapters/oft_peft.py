"""PEFT's OFT (v2, ``oft_R``): blocks of the weight's input columns turned by orthogonal matrices."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Built, Bypass, Keys, Kind, Shape, f32, in_float32
from .rotation import cayley_neumann, skew


@dataclass(frozen=True, eq=False)
class OftV2Adapter:
    """PEFT's OFT (v2, ``oft_R``): the weight's input columns, in blocks, turned by orthogonal
    matrices R = Cayley(S) of skew-symmetric S, each stored as its strict upper triangle (one row of
    ``vectors`` per block, or one row shared by all: ``block_share``), as PEFT merges it: W' = W
    blockdiag(R)^T. The Cayley transform is PEFT's default Neumann series of 5 terms; ``scaled``
    (an ``oft_R.scaled_oft`` flag in the file) divides S by the square root of its element count.
    Depends on the weight itself. No alpha or DoRA applies."""

    vectors: Tensor  # (blocks or 1, size * (size - 1) / 2)
    scaled: bool = False
    alpha: float | None = None
    dora_scale: Tensor | None = None


def build(keys: Keys, t) -> Built | None:
    vectors = keys.get("oft_R")
    if vectors is None:
        return None
    scaled = keys.get("scaled_oft")
    used = [vectors] + ([scaled] if scaled else [])
    return Built(OftV2Adapter(t[vectors], scaled=scaled is not None), used, "PEFT OFT")


def oftv2_block_size(vectors_shape: Shape) -> int | None:
    """The block size whose strict upper triangle holds ``vectors_shape[-1]`` values, or None."""
    if len(vectors_shape) != 2:
        return None
    n = vectors_shape[1]
    size = (1 + math.isqrt(1 + 8 * n)) // 2
    return size if size > 1 and size * (size - 1) // 2 == n else None


def oftv2_fit_error(adapter: OftV2Adapter, shape: Shape) -> str | None:
    """Why PEFT OFT rotations cannot turn a weight of ``shape``, or None."""
    vectors = tuple(adapter.vectors.shape)
    size = oftv2_block_size(vectors)
    if size is None:
        return f"oft_R {vectors} is not (blocks, size * (size - 1) / 2) for any block size"
    columns = math.prod(shape[1:]) if len(shape) > 1 else 0
    if not columns or columns % size:
        return (
            f"oft_R blocks of size {size} do not divide the weight {tuple(shape)}'s {columns} input columns"
        )
    if vectors[0] not in (1, columns // size):
        return f"oft_R has {vectors[0]} blocks of size {size}; the weight {tuple(shape)} needs {columns // size} (or 1, shared)"
    if adapter.dora_scale is not None:
        return "PEFT OFT with dora_scale is not a known layout"
    return None


def _turn(weight: Tensor, adapter: OftV2Adapter, strength: float) -> Tensor:
    """W + strength * (W blockdiag(R)^T - W), R per block of input columns (PEFT's merge at strength 1)."""
    error = oftv2_fit_error(adapter, tuple(weight.shape))
    if error:
        raise ValueError(error)
    vectors = f32(adapter.vectors, weight.device)
    size = oftv2_block_size(tuple(vectors.shape))
    if adapter.scaled:
        vectors = vectors / math.sqrt(vectors.shape[1])
    rows, cols = torch.triu_indices(size, size, 1, device=weight.device)
    upper = vectors.new_zeros(vectors.shape[0], size, size)
    upper[:, rows, cols] = vectors
    rotations = cayley_neumann(skew(upper))
    flat = weight.reshape(weight.shape[0], -1, size)  # (out, blocks, size): blocks of input columns
    turned = torch.einsum("o b k, b c k -> o b c", flat, rotations.expand(flat.shape[1], size, size))
    return weight + strength * (turned.reshape(weight.shape) - weight)


def apply(a: OftV2Adapter, weight: Tensor, strength: float) -> Tensor:
    return in_float32(weight, lambda w: _turn(w, a, strength))


KIND = Kind(
    name="OFT (LyCORIS or PEFT)",  # listed with LyCORIS OFT: one word for users
    record=OftV2Adapter,
    family="oftv2",
    suffixes={".oft_R.weight": "oft_R", ".oft_R.default.weight": "oft_R", ".oft_R.scaled_oft": "scaled_oft"},
    build=build,
    apply=apply,
    fit_error=oftv2_fit_error,
    precedence=8,
    bypass=Bypass("OFT (PEFT)", weight_dependent=True),
    extreme=None,  # the change depends on the weight
    flag_roles=frozenset({"scaled_oft"}),
)
