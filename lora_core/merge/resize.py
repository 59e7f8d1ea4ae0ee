"""Lowering the rank of a LoRA: per module by fixed rank, singular-value ratio or energy kept.

The SVD is factored (QR of up and down^T, SVD of the r x r core), so no (out, in) delta is
ever formed. Results fold the old alpha / rank scale into the factors and store alpha = rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ..adapters import LoraAdapter
from .lowrank import Factors, factored_svd, flatten_conv, split_top, unflatten_conv

ResizeMode = Literal["fixed", "sv_ratio", "energy"]
RESIZE_MODES: tuple[ResizeMode, ...] = get_args(ResizeMode)


@dataclass(frozen=True)
class Resized:
    up: torch.Tensor  # (out, k)
    down: torch.Tensor  # (k, in)
    rank: int
    energy_kept: float
    rel_error: float

    def __iter__(self) -> Iterator[object]:
        yield self.up
        yield self.down


def _check_mode(mode: ResizeMode, value: float) -> None:
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {', '.join(RESIZE_MODES)}; got {mode!r}")
    if mode == "fixed" and (isinstance(value, bool) or int(value) != value or value <= 0):
        raise ValueError(f"value for mode 'fixed' is the new rank, a positive integer; got {value!r}")
    if mode == "sv_ratio" and not 0.0 < float(value) <= 1.0:
        raise ValueError(
            f"value for mode 'sv_ratio' must be in (0, 1] (keep s >= value * s_max), got {value!r}; "
            "for a kohya-style ratio N pass 1/N"
        )
    if mode == "energy" and not 0.0 < float(value) <= 1.0:
        raise ValueError(
            f"value for mode 'energy' is the fraction of Frobenius energy kept, in (0, 1]; got {value!r}"
        )


def select_rank(s: torch.Tensor, mode: ResizeMode, value: float) -> int:
    """How many of the descending singular values `s` a resize keeps (at least 1)."""
    _check_mode(mode, value)
    n = int(s.shape[0])
    if mode == "fixed":
        return max(1, min(int(value), n))
    s64 = s.double()
    if float(s64[0]) <= 0.0:
        return 1  # a zero module: keep one (zero) component so the file stays regular
    if mode == "sv_ratio":
        return max(1, int((s64 >= float(value) * s64[0]).sum()))
    energy = torch.cumsum(s64**2, 0) / (s64**2).sum()
    # A tiny tolerance so that value = 1.0 does not fail on float rounding of the last sum.
    return max(1, min(n, int((energy < float(value) - 1e-12).sum()) + 1))


def resize(
    up: torch.Tensor, down: torch.Tensor, mode: ResizeMode, value: float, dtype: torch.dtype | None = None
) -> Resized:
    """Lower the rank of up (out, r) @ down (r, in); returns new factors and what was kept."""
    _check_mode(mode, value)
    if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"resize needs up (out, r) and down (r, in), got {tuple(up.shape)} and {tuple(down.shape)}; "
            "flatten conv factors with flatten_conv first"
        )
    svd = factored_svd(up, down)
    factors, cut = split_top(svd, select_rank(svd.s, mode, value), dtype or up.dtype)
    return Resized(factors.up, factors.down, cut.rank, cut.energy_kept, cut.rel_error)


@dataclass(frozen=True)
class ResizeReport:
    old_rank: int
    new_rank: int
    energy_kept: float
    rel_error: float


@dataclass(frozen=True)
class ResizeResult:
    modules: dict[str, LoraAdapter]  # file-ready, alpha = new rank (scale 1)
    reports: dict[str, ResizeReport]


def resize_modules(
    modules: Mapping[str, LoraAdapter],
    mode: ResizeMode,
    value: float,
    dtype: torch.dtype | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> ResizeResult:
    """Resize every module of a kohya-style LoRA (alpha applied, conv kept as conv)."""
    _check_mode(mode, value)
    out: dict[str, LoraAdapter] = {}
    reports: dict[str, ResizeReport] = {}
    for step, (name, module) in enumerate(modules.items(), start=1):
        try:
            factors = flatten_conv(module.up, module.down)
        except ValueError as error:
            raise ValueError(f"module '{name}': {error}") from error
        scale = float(module.alpha) / factors.rank
        result = resize(factors.up.float() * scale, factors.down, mode, value, dtype or module.up.dtype)
        up, down = unflatten_conv(Factors(result.up, result.down, kernel=factors.kernel))
        out[name] = LoraAdapter(up=up, down=down, alpha=float(result.rank))
        reports[name] = ResizeReport(factors.rank, result.rank, result.energy_kept, result.rel_error)
        if on_step is not None:
            on_step(step, len(modules))
    return ResizeResult(modules=out, reports=reports)
