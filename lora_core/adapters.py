"""Adapter records (LoRA, LoHa, LoKr, full diffs) and the math that turns them into weight changes.

The numbers follow ComfyUI core's ``calculate_weight`` (0.3.75) for strength_model = 1, no offset
and no extra function: a file applied here and there gives the same weights (fp32, 1e-5).
Everything is computed in float32 and cast back to the target weight's dtype and device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

Shape = tuple[int, ...]


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


@dataclass(frozen=True, eq=False)
class LohaAdapter:
    """LyCORIS LoHa: delta = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), elementwise (Hadamard)."""

    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    alpha: float | None = None
    t1: Tensor | None = None  # Tucker cores; with them w*_a is (r, out) and w*_b is (r, in)
    t2: Tensor | None = None
    dora_scale: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.t1 is None) != (self.t2 is None):
            raise ValueError("LoHa Tucker form needs both hada_t1 and hada_t2, got only one")

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])


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


@dataclass(frozen=True, eq=False)
class DiffAdapter:
    """A full difference added as ``weight + strength * diff`` (``.diff``, ``.diff_b``, ``.w_norm``)."""

    diff: Tensor


@dataclass(frozen=True, eq=False)
class SetAdapter:
    """``.set_weight``: replaces the weight; ComfyUI ignores strength for it, and so do we."""

    weight: Tensor


@dataclass(frozen=True, eq=False)
class OftAdapter:
    """LyCORIS (diag-)OFT: the weight's rows, in blocks, turned by orthogonal matrices (Cayley
    transform of the skew part of ``blocks``); ``alpha`` > 0 bounds the norm of that skew part.
    The change depends on the weight itself, so it is never summed with others."""

    blocks: Tensor  # (block_num, block_size, block_size); block_num * block_size = the weight's rows
    alpha: float | None = None
    dora_scale: Tensor | None = None


@dataclass(frozen=True, eq=False)
class BoftAdapter:
    """LyCORIS butterfly OFT: ``levels`` rounds of block-diagonal rotations (Cayley transforms, as in
    OFT), each round pairing rows ``2**i * block_size / 2`` apart, so the product mixes every row
    with every other one; then ``rescale`` (one factor per row) if the file has it."""

    blocks: Tensor  # (levels, block_num, block_size, block_size); block_num * block_size = rows
    rescale: Tensor | None = None
    alpha: float | None = None
    dora_scale: Tensor | None = None


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


@dataclass(frozen=True, eq=False)
class Ia3Adapter:
    """LyCORIS (IA)^3: the weight scaled by ``1 + strength * w``, one factor per input column
    (``on_input``) or per output row. Depends on the weight itself. No alpha or DoRA applies; the
    fields are there because every parsed adapter carries them."""

    weight: Tensor  # (n,) or (1, n, 1, 1): n = the weight's inputs or outputs
    on_input: bool
    alpha: float | None = None
    dora_scale: Tensor | None = None


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


Adapter = (
    LoraAdapter
    | LohaAdapter
    | LokrAdapter
    | DiffAdapter
    | SetAdapter
    | OftAdapter
    | BoftAdapter
    | GloraAdapter
    | Ia3Adapter
    | OftV2Adapter
)


def _f32(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device=device, dtype=torch.float32)


def _reshape(diff: Tensor, shape: Shape, kind: str) -> Tensor:
    if diff.numel() != math.prod(shape):
        raise ValueError(
            f"{kind} gives {tuple(diff.shape)} ({diff.numel()} values) but the target weight is {tuple(shape)}: "
            "the LoRA was made for a different model"
        )
    return diff.reshape(shape)


def _lora_raw(a: LoraAdapter, device: torch.device) -> Tensor:
    """up @ down (after folding a Tucker mid into down), flattened to (out, in*k*k), unscaled."""
    up = _f32(a.up, device).flatten(start_dim=1)  # (out, r)
    down = _f32(a.down, device)
    if a.mid is not None:
        mid = _f32(a.mid, device)  # (r, r, kh, kw)
        down = torch.einsum("o i h w, i n -> o n h w", mid, down.flatten(start_dim=1))
    return up @ down.flatten(start_dim=1)  # (out, r) @ (r, in*k*k)


def _loha_raw(a: LohaAdapter, device: torch.device) -> Tensor:
    if a.t1 is not None:
        rebuild = "i j k l, j r, i p -> p r k l"
        m1 = torch.einsum(rebuild, _f32(a.t1, device), _f32(a.w1_b, device), _f32(a.w1_a, device))
        m2 = torch.einsum(rebuild, _f32(a.t2, device), _f32(a.w2_b, device), _f32(a.w2_a, device))
    else:
        m1 = _f32(a.w1_a, device) @ _f32(a.w1_b, device)
        m2 = _f32(a.w2_a, device) @ _f32(a.w2_b, device)
    return m1 * m2


def _lokr_raw(a: LokrAdapter, device: torch.device) -> Tensor:
    w1 = _f32(a.w1, device) if a.w1 is not None else _f32(a.w1_a, device) @ _f32(a.w1_b, device)
    if a.w2 is not None:
        w2 = _f32(a.w2, device)
    elif a.t2 is not None:
        w2 = torch.einsum(
            "i j k l, j r, i p -> p r k l", _f32(a.t2, device), _f32(a.w2_b, device), _f32(a.w2_a, device)
        )
    else:
        w2 = _f32(a.w2_a, device) @ _f32(a.w2_b, device)
    if w2.dim() == 4 and w1.dim() == 2:
        w1 = w1[:, :, None, None]  # kron of a matrix with a conv kernel keeps the kernel size
    return torch.kron(w1.contiguous(), w2.contiguous())


def scale_of(adapter: Adapter) -> float:
    """The alpha/rank factor ComfyUI applies (1.0 when alpha is absent or does not apply)."""
    if isinstance(adapter, (LoraAdapter, LohaAdapter)):
        return 1.0 if adapter.alpha is None else adapter.alpha / adapter.rank
    if isinstance(adapter, LokrAdapter):
        rank = adapter.factor_rank
        return 1.0 if adapter.alpha is None or rank is None else adapter.alpha / rank
    return 1.0


def is_linear(adapter: Adapter) -> bool:
    """True when ``apply`` is ``weight + strength * delta``: such adapters can be summed in one pass."""
    if isinstance(adapter, (SetAdapter, OftAdapter, BoftAdapter, GloraAdapter, Ia3Adapter, OftV2Adapter)):
        return False
    return getattr(adapter, "dora_scale", None) is None and getattr(adapter, "reshape", None) is None


def delta(adapter: Adapter, shape: Shape, device: torch.device | str = "cpu") -> Tensor:
    """Dense float32 change at strength 1, shaped like the target weight (linear adapters only)."""
    if not is_linear(adapter):
        raise ValueError(
            f"{type(adapter).__name__} with DoRA, set_weight or a reshape is not a plain sum; use apply() for it"
        )
    return _scaled_raw(adapter, tuple(shape), torch.device(device))


def _scaled_raw(adapter: Adapter, shape: Shape, device: torch.device) -> Tensor:
    kind = type(adapter).__name__
    if isinstance(adapter, LoraAdapter):
        raw = _lora_raw(adapter, device)
    elif isinstance(adapter, LohaAdapter):
        raw = _loha_raw(adapter, device)
    elif isinstance(adapter, LokrAdapter):
        raw = _lokr_raw(adapter, device)
    elif isinstance(adapter, DiffAdapter):
        if tuple(adapter.diff.shape) != shape:
            raise ValueError(f"diff has shape {tuple(adapter.diff.shape)} but the target weight is {shape}")
        return _f32(adapter.diff, device)
    else:
        raise TypeError(f"not an adapter record: {kind}")
    return _reshape(raw, shape, kind) * scale_of(adapter)


def scaled_factors(adapter: LoraAdapter) -> tuple[Tensor, Tensor]:
    """(up * scale, down) as 2-D float32, so several LoRAs can be concatenated along the rank."""
    if not isinstance(adapter, LoraAdapter) or not is_linear(adapter):
        raise ValueError("scaled_factors needs a plain LoraAdapter (no DoRA)")
    device = adapter.up.device
    down = _f32(adapter.down, device)
    if adapter.mid is not None:
        down = torch.einsum("o i h w, i n -> o n h w", _f32(adapter.mid, device), down.flatten(start_dim=1))
    up = _f32(adapter.up, device).flatten(start_dim=1) * scale_of(adapter)
    return up, down.flatten(start_dim=1)


def peft_dora_fit_error(adapter: LoraAdapter, shape: Shape) -> str | None:
    """Why a PEFT DoRA magnitude cannot scale a weight of ``shape``'s output rows, or None."""
    if adapter.dora_peft and adapter.dora_scale is not None and adapter.dora_scale.numel() != shape[0]:
        return (
            f"PEFT DoRA lora_magnitude_vector of {adapter.dora_scale.numel()} does not fit the weight "
            f"{tuple(shape)}'s {shape[0]} outputs"
        )
    return None


def _dora(weight: Tensor, scaled: Tensor, dora_scale: Tensor, strength: float, peft: bool = False) -> Tensor:
    """Weight decomposition as ComfyUI's ``weight_decompose`` does it, all in float32; with
    ``peft``, as PEFT merges DoRA: magnitude * (W + delta) / ||W + delta|| per output row.

    ComfyUI quirk kept on purpose (results must match core): when the magnitude lies on the
    output axis the norm is taken from the ORIGINAL weight, not from weight + delta.
    """
    merged = weight + scaled
    scale = _f32(dora_scale, weight.device)
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


def apply(adapter: Adapter, weight: Tensor, strength: float = 1.0) -> Tensor:
    """New weight = weight patched by ``adapter`` at ``strength``; ``weight`` is left untouched."""
    if isinstance(adapter, SetAdapter):
        return adapter.weight.to(device=weight.device, dtype=weight.dtype, copy=True)
    reshape = getattr(adapter, "reshape", None)
    if reshape is not None:
        weight = padded(weight, reshape)
    w32 = weight.to(dtype=torch.float32, copy=True)
    shape = tuple(weight.shape)
    if isinstance(adapter, OftAdapter):
        return _oft(w32, adapter, strength).to(weight.dtype)
    if isinstance(adapter, BoftAdapter):
        return _boft(w32, adapter, strength).to(weight.dtype)
    if isinstance(adapter, GloraAdapter):
        return _glora(w32, adapter, strength).to(weight.dtype)
    if isinstance(adapter, Ia3Adapter):
        return _ia3(w32, adapter, strength).to(weight.dtype)
    if isinstance(adapter, OftV2Adapter):
        return _oftv2(w32, adapter, strength).to(weight.dtype)
    if isinstance(adapter, DiffAdapter):
        if strength == 0.0:
            return weight.clone()
        return (w32 + strength * _scaled_raw(adapter, shape, weight.device)).to(weight.dtype)
    scaled = _scaled_raw(adapter, shape, weight.device)
    dora_scale = getattr(adapter, "dora_scale", None)
    if dora_scale is not None:
        out = _dora(w32, scaled, dora_scale, strength, peft=getattr(adapter, "dora_peft", False))
    else:
        out = w32 + strength * scaled
    return out.to(weight.dtype)


def _oft(weight: Tensor, adapter: OftAdapter, strength: float) -> Tensor:
    """OFT as ComfyUI's OFTAdapter computes it (float32), block by block; see the quirk below."""
    blocks = _f32(adapter.blocks, weight.device)
    num, size = blocks.shape[0], blocks.shape[1]
    if blocks.dim() != 3 or blocks.shape[2] != size or num * size != weight.shape[0]:
        raise ValueError(f"OFT blocks {tuple(blocks.shape)} do not fit a weight with {weight.shape[0]} rows")
    eye = torch.eye(size, device=weight.device, dtype=torch.float32)
    skew = blocks - blocks.transpose(1, 2)
    alpha = adapter.alpha or 0.0
    if alpha > 0:  # in OFT, alpha is a bound on the skew part's norm
        norm = torch.norm(skew) + 1e-8
        if norm > alpha:
            skew = skew * alpha / norm
    rotation = (eye + skew) @ torch.linalg.inv(eye - skew)
    change = torch.einsum(
        "k n m, k n ... -> k m ...",
        rotation * strength - strength * eye,
        weight.view(num, size, *weight.shape[1:]),
    ).reshape(weight.shape)
    if adapter.dora_scale is not None:  # ComfyUI passes the OFT alpha (0 when absent) as DoRA's alpha
        return _dora(weight, alpha * change, adapter.dora_scale, strength)
    # ComfyUI quirk kept on purpose (results must match core): the strength is applied a second
    # time here, so a plain OFT at strength s changes the weight by s^2 (R - I) W.
    return weight + strength * change


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


def _boft(weight: Tensor, adapter: BoftAdapter, strength: float) -> Tensor:
    """Butterfly OFT as ComfyUI's BOFTAdapter computes it (float32); same quirks as ``_oft``."""
    error = boft_fit_error(tuple(adapter.blocks.shape), weight.shape[0])
    if error:
        raise ValueError(error)
    blocks = _f32(adapter.blocks, weight.device)
    size = blocks.shape[2]
    eye = torch.eye(size, device=weight.device, dtype=torch.float32)
    skew = blocks - blocks.transpose(-1, -2)
    # A file without alpha: no bound, as in OFT (ComfyUI core fails on it and skips the module).
    alpha = adapter.alpha or 0.0
    if alpha > 0:
        norm = torch.norm(skew) + 1e-8
        if norm > alpha:
            skew = skew * alpha / norm
    rotations = (eye + skew) @ torch.linalg.inv(eye - skew)
    if strength != 1.0:  # each level is pulled toward the identity ...
        rotations = strength * rotations + (1.0 - strength) * eye
    turned = _butterfly(weight, rotations)
    if adapter.rescale is not None:
        turned = turned * _f32(adapter.rescale, weight.device)
    change = turned - weight
    if adapter.dora_scale is not None:
        return _dora(weight, alpha * change, adapter.dora_scale, strength)
    # ... and, as ComfyUI does (kept so results match core), the change is scaled by it again.
    return weight + strength * change


def ia3_fit_error(adapter: Ia3Adapter, shape: Shape) -> str | None:
    """Why an (IA)^3 vector cannot scale a weight of ``shape``, or None."""
    axis = 1 if adapter.on_input else 0
    if len(shape) < 2 or adapter.weight.numel() != shape[axis]:
        side = "inputs" if adapter.on_input else "outputs"
        return f"(IA)3 vector of {adapter.weight.numel()} does not fit the weight {tuple(shape)}'s {side}"
    if adapter.dora_scale is not None:
        return "(IA)3 with dora_scale is not a known layout"
    return None


def _ia3(weight: Tensor, adapter: Ia3Adapter, strength: float) -> Tensor:
    """W * (1 + strength * w), w along the input or the output axis, as LyCORIS's IA3 module merges."""
    error = ia3_fit_error(adapter, tuple(weight.shape))
    if error:
        raise ValueError(error)
    axis = 1 if adapter.on_input else 0
    shape = [1] * weight.dim()
    shape[axis] = -1
    return weight * (1.0 + strength * _f32(adapter.weight, weight.device).reshape(shape))


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


def _cayley_neumann(skew: Tensor) -> Tensor:
    """PEFT's default Cayley transform: (I + S)(I - S)^-1 by 5 terms of its Neumann series,
    I + 2S + 2S^2 + 2S^3 + S^4 (what PEFT computes for ``num_cayley_neumann_terms`` = 5)."""
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    s2 = skew @ skew
    s3 = s2 @ skew
    return eye + 2 * (skew + s2 + s3) + s3 @ skew


def _oftv2(weight: Tensor, adapter: OftV2Adapter, strength: float) -> Tensor:
    """W + strength * (W blockdiag(R)^T - W), R per block of input columns (PEFT's merge at strength 1)."""
    error = oftv2_fit_error(adapter, tuple(weight.shape))
    if error:
        raise ValueError(error)
    vectors = _f32(adapter.vectors, weight.device)
    size = oftv2_block_size(tuple(vectors.shape))
    if adapter.scaled:
        vectors = vectors / math.sqrt(vectors.shape[1])
    rows, cols = torch.triu_indices(size, size, 1, device=weight.device)
    upper = vectors.new_zeros(vectors.shape[0], size, size)
    upper[:, rows, cols] = vectors
    rotations = _cayley_neumann(upper - upper.transpose(1, 2))
    flat = weight.reshape(weight.shape[0], -1, size)  # (out, blocks, size): blocks of input columns
    turned = torch.einsum("o b k, b c k -> o b c", flat, rotations.expand(flat.shape[1], size, size))
    return weight + strength * (turned.reshape(weight.shape) - weight)


def _glora(weight: Tensor, adapter: GloraAdapter, strength: float) -> Tensor:
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
        _f32(t, weight.device).flatten(start_dim=1) for t in (adapter.a1, adapter.a2, adapter.b1, adapter.b2)
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
        return _dora(weight, alpha * change, adapter.dora_scale, strength)
    return weight + strength * alpha * change


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


def rank_of(adapter: Adapter) -> int | None:
    """The adapter's rank where the notion applies (LoRA, LoHa, factorised LoKr)."""
    if isinstance(adapter, (LoraAdapter, LohaAdapter)):
        return adapter.rank
    if isinstance(adapter, LokrAdapter):
        return adapter.factor_rank
    return None
