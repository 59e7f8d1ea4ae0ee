"""Low-rank records and the factored SVD shared by merging, resizing and saving LoRAs.

Every function here works on 2-D factors: up (out, r) and down (r, in). Conv LoRAs are
flattened first (down (r, in, kh, kw) -> (r, in*kh*kw), up (out, r, 1, 1) -> (out, r)) and
the kernel size travels with the record so the result can be reshaped back for the file.
Maths runs in float32 with the small core SVD in float64; results are cast back by callers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

Kernel = tuple[int, int]


@dataclass(frozen=True)
class Factors:
    """One LoRA term for one module, already scaled by alpha / rank: delta = up @ down."""

    up: torch.Tensor  # (out, r)
    down: torch.Tensor  # (r, in)  in = in_channels * kh * kw for conv
    kernel: Kernel | None = None  # None for linear layers, (kh, kw) for conv

    def __post_init__(self) -> None:
        if self.up.dim() != 2 or self.down.dim() != 2:
            raise ValueError(
                f"Factors need 2-D up and down, got up {tuple(self.up.shape)} and down "
                f"{tuple(self.down.shape)}; flatten conv factors first with flatten_conv(up, down)"
            )
        if self.up.shape[1] != self.down.shape[0]:
            raise ValueError(
                f"Factors rank mismatch: up {tuple(self.up.shape)} has rank {self.up.shape[1]} but down "
                f"{tuple(self.down.shape)} has rank {self.down.shape[0]}; pass up (out, r) and down (r, in)"
            )

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the delta the factors stand for."""
        return int(self.up.shape[0]), int(self.down.shape[1])

    def __iter__(self) -> Iterator[torch.Tensor]:
        # Allows `up, down = factors` where the pair reads naturally.
        yield self.up
        yield self.down


@dataclass(frozen=True)
class DenseDelta:
    """A module delta given as a full matrix (LoHa, LoKr, DoRA... computed by the caller)."""

    delta: torch.Tensor  # (out, in)  in = in_channels * kh * kw for conv
    kernel: Kernel | None = None

    def __post_init__(self) -> None:
        if self.delta.dim() != 2:
            raise ValueError(
                f"DenseDelta needs a 2-D delta, got {tuple(self.delta.shape)}; "
                "use dense_term(delta) to flatten a conv delta (out, in, kh, kw)"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.delta.shape[0]), int(self.delta.shape[1])


# A module's change as merging sees it: factored or dense. (A patch's adapter-at-a-strength is
# patching.Term, the library's one Term.)
ModuleDelta = Factors | DenseDelta


@dataclass(frozen=True)
class Svd:
    """A thin SVD u @ diag(s) @ vh with s sorted descending."""

    u: torch.Tensor  # (out, m) float32, orthonormal columns
    s: torch.Tensor  # (m,) float64
    vh: torch.Tensor  # (m, in) float32, orthonormal rows


@dataclass(frozen=True)
class Truncation:
    """What a rank cut kept: rank, fraction of Frobenius energy, relative Frobenius error."""

    rank: int
    energy_kept: float
    rel_error: float


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> Svd:
    """SVD of up @ down without forming the (out, in) product.

    QR of up (out, R) and of down^T (in, R), then the SVD of the small core R_u @ R_d^T.
    The singular values are exactly those of up @ down (Eckart-Young applies to them).
    """
    qu, ru = torch.linalg.qr(up.float())  # (out, p), (p, R)
    qd, rd = torch.linalg.qr(down.float().T)  # (in, q), (q, R)
    core = ru.double() @ rd.double().T  # (p, R) @ (R, q) -> (p, q)
    cu, s, cvh = torch.linalg.svd(core, full_matrices=False)
    u = qu @ cu.float()  # (out, p) @ (p, m)
    vh = cvh.float() @ qd.T  # (m, q) @ (q, in)
    return Svd(u=u, s=s, vh=vh)


def dense_svd(delta: torch.Tensor) -> Svd:
    """Thin SVD of a dense (out, in) matrix, in float32."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return Svd(u=u, s=s.double(), vh=vh)


def truncation(s: torch.Tensor, rank: int) -> Truncation:
    """Energy kept and relative Frobenius error of keeping the first `rank` singular values."""
    power = s.double() ** 2
    total = float(power.sum())
    kept = float(power[:rank].sum())
    if total <= 0.0:
        return Truncation(rank=rank, energy_kept=1.0, rel_error=0.0)
    dropped = float(power[rank:].sum())
    return Truncation(rank=rank, energy_kept=kept / total, rel_error=math.sqrt(dropped / total))


def split_top(svd: Svd, rank: int, dtype: torch.dtype) -> tuple[Factors, Truncation]:
    """Top-`rank` factors with sqrt(s) put on both sides, cast to `dtype`."""
    k = max(1, min(rank, int(svd.s.shape[0])))
    root = svd.s[:k].sqrt().float()
    up = svd.u[:, :k] * root  # (out, k) * (k,)
    down = root[:, None] * svd.vh[:k]  # (k, 1) * (k, in)
    factors = Factors(up=up.to(dtype).contiguous(), down=down.to(dtype).contiguous())
    return factors, truncation(svd.s, k)


def factored_fro(up: torch.Tensor, down: torch.Tensor) -> float:
    """||up @ down||_F from the two r x r Gram matrices, without forming the product."""
    up64, down64 = up.double(), down.double()
    gram = (up64.T @ up64) * (down64 @ down64.T)  # (r, r) elementwise (r, r)
    return math.sqrt(max(0.0, float(gram.sum())))


def flatten_conv(up: torch.Tensor, down: torch.Tensor) -> Factors:
    """Conv LoRA factors as 2-D Factors: up (out, r, 1, 1), down (r, in, kh, kw) -> (out, r), (r, in*kh*kw)."""
    if up.dim() == 2 and down.dim() == 2:
        return Factors(up=up, down=down)
    if up.dim() != 4 or down.dim() != 4:
        raise ValueError(
            f"conv LoRA factors must both be 4-D, got up {tuple(up.shape)} and down {tuple(down.shape)}"
        )
    if tuple(up.shape[2:]) != (1, 1):
        raise ValueError(
            f"conv LoRA up must be 1x1, got kernel {tuple(up.shape[2:])}; "
            "a kohya LoCon has the spatial kernel on down only"
        )
    kernel = (int(down.shape[2]), int(down.shape[3]))
    return Factors(up=up.flatten(1), down=down.flatten(1), kernel=kernel)


def unflatten_conv(factors: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """Back to file shapes: (out, r, 1, 1) and (r, in, kh, kw); linear factors pass through."""
    if factors.kernel is None:
        return factors.up, factors.down
    kh, kw = factors.kernel
    out, r = factors.up.shape
    in_channels = factors.down.shape[1] // (kh * kw)
    return factors.up.reshape(out, r, 1, 1), factors.down.reshape(r, in_channels, kh, kw)


def dense_term(delta: torch.Tensor) -> DenseDelta:
    """A dense delta (out, in) or conv delta (out, in, kh, kw) as a 2-D DenseDelta."""
    if delta.dim() == 2:
        return DenseDelta(delta=delta)
    if delta.dim() == 4:
        kernel = (int(delta.shape[2]), int(delta.shape[3]))
        return DenseDelta(delta=delta.flatten(1), kernel=kernel)
    raise ValueError(f"a dense delta must be 2-D or 4-D (conv), got shape {tuple(delta.shape)}")
