"""Applying several adapters to one weight in a single pass (the fused stack patch).

A run of plain LoRAs becomes one GEMM over concatenated factors,
``[s1*B1 | s2*B2 | ...] @ [A1; A2; ...]``, other linear adapters (LoHa, LoKr, full diffs) are
added in the same pass, and adapters that are not a plain sum (DoRA, set_weight) are applied in
their place in the order given, so the result equals applying the terms one after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapters import Adapter, LoraAdapter, apply, delta, is_linear, scaled_factors


@dataclass(frozen=True)
class Term:
    """One adapter at one strength, as part of a patch on one weight."""

    adapter: Adapter
    strength: float


def _linear_sum(terms: Sequence[Term], shape: tuple[int, ...], device: torch.device) -> Tensor:
    ups, downs = [], []
    total = None
    for t in terms:
        if isinstance(t.adapter, LoraAdapter):
            up, down = scaled_factors(t.adapter)
            ups.append(up.to(device) * t.strength)  # (out, r_i)
            downs.append(down.to(device))  # (r_i, in)
        else:
            d = delta(t.adapter, shape, device) * t.strength
            total = d if total is None else total + d
    if ups:
        fused = (torch.cat(ups, dim=1) @ torch.cat(downs, dim=0)).reshape(shape)  # (out, R) @ (R, in)
        total = fused if total is None else total + fused
    return total


def apply_terms(terms: Sequence[Term], weight: Tensor) -> Tensor:
    """New weight with every term applied in order; ``weight`` itself is not modified."""
    shape = tuple(weight.shape)
    out = weight.to(torch.float32, copy=True)
    run: list[Term] = []
    for term in [*terms, None]:
        if term is not None and is_linear(term.adapter):
            if term.strength != 0.0:
                run.append(term)
            continue
        if run:
            out += _linear_sum(run, shape, out.device)
            run = []
        if term is not None:
            out = apply(term.adapter, out, term.strength)
    return out.to(weight.dtype)
