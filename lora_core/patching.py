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


def _add_linear_(terms: Sequence[Term], work: Tensor) -> None:
    """work += sum of the terms' changes; all plain LoRAs go through one GEMM."""
    ups, downs = [], []
    for t in terms:
        if isinstance(t.adapter, LoraAdapter):
            up, down = scaled_factors(t.adapter)
            ups.append(up.to(work.device) * t.strength)  # (out, r_i)
            downs.append(down.to(work.device))  # (r_i, in)
        else:
            work += delta(t.adapter, tuple(work.shape), work.device) * t.strength
    if not ups:
        return
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)  # (out, R), (R, in)
    if work.is_contiguous():
        work.view(work.shape[0], -1).addmm_(up, down)
    else:
        work += (up @ down).reshape(work.shape)


def apply_terms_(terms: Sequence[Term], work: Tensor) -> Tensor:
    """Applies every term in order to ``work`` (float32), in place where the math allows.

    Returns the result, which is ``work`` itself unless a non-linear term replaced it.
    """
    run: list[Term] = []
    for term in [*terms, None]:
        if term is not None and is_linear(term.adapter):
            if term.strength != 0.0:
                run.append(term)
            continue
        if run:
            _add_linear_(run, work)
            run = []
        if term is not None:
            work = apply(term.adapter, work, term.strength)
    return work


def apply_terms(terms: Sequence[Term], weight: Tensor) -> Tensor:
    """New weight with every term applied in order; ``weight`` itself is not modified."""
    return apply_terms_(terms, weight.to(torch.float32, copy=True)).to(weight.dtype)
