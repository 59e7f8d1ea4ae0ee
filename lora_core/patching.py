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


@dataclass(frozen=True)
class FusedLora:
    """A run of plain LoRA terms concatenated once: change = up @ down, strengths folded into up."""

    up: Tensor  # (out, R) float32, R = sum of ranks
    down: Tensor  # (R, in) float32


def fuse_loras(terms: Sequence[Term]) -> FusedLora:
    ups, downs = [], []
    for t in terms:
        up, down = scaled_factors(t.adapter)
        ups.append(up * t.strength)  # (out, r_i)
        downs.append(down)  # (r_i, in)
    return FusedLora(torch.cat(ups, dim=1).contiguous(), torch.cat(downs, dim=0).contiguous())


Step = FusedLora | Term


def prepare(terms: Sequence[Term]) -> tuple[Step, ...]:
    """Terms in application order, each run of consecutive plain LoRAs fused into one FusedLora.

    Done once when a node runs, so the patch applied at every model load is one GEMM per weight.
    """
    steps: list[Step] = []
    run: list[Term] = []
    for term in [*terms, None]:
        if term is not None and term.strength == 0.0 and is_linear(term.adapter):
            continue
        plain = term is not None and isinstance(term.adapter, LoraAdapter) and is_linear(term.adapter)
        if plain:
            run.append(term)
            continue
        if run:
            steps.append(fuse_loras(run))
            run = []
        if term is not None:
            steps.append(term)
    return tuple(steps)


def apply_steps_(steps: Sequence[Step], work: Tensor) -> Tensor:
    """Applies prepared steps to ``work`` (float32) in place where the math allows; returns the result."""
    for step in steps:
        if isinstance(step, FusedLora):
            up, down = step.up.to(work.device), step.down.to(work.device)
            if work.is_contiguous():
                work.view(work.shape[0], -1).addmm_(up, down)  # (out, R) @ (R, in)
            else:
                work += (up @ down).reshape(work.shape)
        elif is_linear(step.adapter):
            work += delta(step.adapter, tuple(work.shape), work.device) * step.strength
        else:
            work = apply(step.adapter, work, step.strength)
    return work


def apply_terms_(terms: Sequence[Term], work: Tensor) -> Tensor:
    """Applies every term in order to ``work`` (float32), in place where the math allows."""
    return apply_steps_(prepare(terms), work)


def apply_terms(terms: Sequence[Term], weight: Tensor) -> Tensor:
    """New weight with every term applied in order; ``weight`` itself is not modified."""
    return apply_terms_(terms, weight.to(torch.float32, copy=True)).to(weight.dtype)
