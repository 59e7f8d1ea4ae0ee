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

from .adapters import Adapter, LoraAdapter, apply, delta, is_linear, scale_of, scaled_factors


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
    """Writes each term's scaled factors straight into the concatenated float32 buffers."""
    pieces = []  # (up 2-D, down 2-D, scale, strength), any float dtype
    for term in terms:
        adapter = term.adapter
        if adapter.mid is None:
            pieces.append((adapter.up.flatten(1), adapter.down.flatten(1), scale_of(adapter), term.strength))
        else:  # Tucker (LoCon with lora_mid): the mid folds into down
            up, down = scaled_factors(adapter)
            pieces.append((up, down, 1.0, term.strength))
    device = pieces[0][0].device
    rank = sum(down.shape[0] for _, down, _, _ in pieces)
    up_all = torch.empty(pieces[0][0].shape[0], rank, dtype=torch.float32, device=device)
    down_all = torch.empty(rank, pieces[0][1].shape[1], dtype=torch.float32, device=device)
    at = 0
    for up, down, scale, strength in pieces:
        part = up_all[:, at : at + down.shape[0]]
        part.copy_(up)
        if scale != 1.0:
            part.mul_(scale)
        part.mul_(strength)
        down_all[at : at + down.shape[0]].copy_(down)
        at += down.shape[0]
    return FusedLora(up_all, down_all)


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
