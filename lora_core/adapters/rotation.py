"""The orthogonal-rotation math OFT, BOFT and PEFT OFT share: skew parts, the norm bound, Cayley."""

from __future__ import annotations

import torch
from torch import Tensor


def skew(blocks: Tensor) -> Tensor:
    """The skew-symmetric part (times two) of square blocks: B - B^T over the last two axes."""
    return blocks - blocks.transpose(-1, -2)


def bounded(skew_part: Tensor, alpha: float) -> Tensor:
    """LyCORIS's bound: with alpha > 0, the skew part scaled down to norm alpha when it is larger."""
    if alpha > 0:
        norm = torch.norm(skew_part) + 1e-8
        if norm > alpha:
            return skew_part * alpha / norm
    return skew_part


def cayley(skew_part: Tensor, eye: Tensor) -> Tensor:
    """The exact Cayley transform (I + S)(I - S)^-1, an orthogonal matrix per block."""
    return (eye + skew_part) @ torch.linalg.inv(eye - skew_part)


def cayley_neumann(skew_part: Tensor) -> Tensor:
    """PEFT's default Cayley transform: (I + S)(I - S)^-1 by 5 terms of its Neumann series,
    I + 2S + 2S^2 + 2S^3 + S^4 (what PEFT computes for ``num_cayley_neumann_terms`` = 5)."""
    eye = torch.eye(skew_part.shape[-1], device=skew_part.device, dtype=skew_part.dtype).expand_as(skew_part)
    s2 = skew_part @ skew_part
    s3 = s2 @ skew_part
    return eye + 2 * (skew_part + s2 + s3) + s3 @ skew_part
