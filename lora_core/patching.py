"""Applying several adapters to one weight in a single pass (the fused stack patch).

A run of plain LoRAs becomes one GEMM over concatenated factors,
``[s1*B1 | s2*B2 | ...] @ [A1; A2; ...]``, other linear adapters (LoHa, LoKr, full diffs) are
added in the same pass, and adapters that are not a plain sum (DoRA, set_weight) are applied in
their place in the order given, so the result equals applying the terms one after another.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .adapters import Adapter, LoraAdapter, apply, delta, is_linear, scale_of, scaled_factors


@dataclass(frozen=True)
class Term:
    """One adapter at one strength, as part of a patch on one weight."""

    adapter: Adapter
    strength: float


@dataclass(frozen=True, eq=False)
class FusedFactors:
    """A run of plain LoRAs concatenated once, scales and strengths not yet applied.

    The change at strengths s is ``(up * (scale * s) per column) @ down``. ``up`` and ``down``
    keep the files' dtype when every factor shares one (fp16 / bf16 files: half the memory of
    float32 copies, converted weight by weight when a patch runs, exactly); else float32. One
    object serves every strength of the same adapters, so a strength change builds nothing new
    (see ``fused_factors``).
    """

    adapters: tuple[Adapter, ...]  # kept alive with the factors: the cache key is their ids
    up: Tensor  # (out, R), R = sum of ranks
    down: Tensor  # (R, in)
    ranks: tuple[int, ...]
    scales: tuple[float, ...]  # each term's alpha / rank (1.0 where it is already in ``up``)


@dataclass(frozen=True, eq=False)
class FusedLora:
    """A run of plain LoRA terms: concatenated factors and one strength per term."""

    factors: FusedFactors
    strengths: tuple[float, ...]

    @cached_property
    def _coefficients(self) -> tuple[float, ...]:
        return tuple(c * s for c, s in zip(self.factors.scales, self.strengths, strict=True))

    @cached_property
    def _per_column(self) -> Tensor:
        """Each term's coefficient (scale * strength) repeated over its rank: one per column of ``up``."""
        coefficients = torch.tensor(self._coefficients, dtype=torch.float32)
        return coefficients.repeat_interleave(torch.tensor(self.factors.ranks))

    def scaled(self, device: torch.device | str) -> tuple[Tensor, Tensor, float]:
        """(up, down, alpha), float32 on ``device``, with the change ``alpha * up @ down``.

        One coefficient for every term (one LoRA, or a stack whose terms share scale and
        strength): it is ``alpha`` and the factors are used as they are. Otherwise the
        coefficients are folded into the smaller of the two factors, a new tensor."""
        up, down = self.factors.up.to(device), self.factors.down.to(device)
        if len(set(self._coefficients)) == 1:
            return up.float(), down.float(), self._coefficients[0]
        per_column = self._per_column.to(device)
        # a half-precision factor times float32 coefficients gives float32 in one pass
        if up.numel() <= down.numel():
            return up * per_column, down.float(), 1.0
        return up.float(), down * per_column[:, None], 1.0


# Concatenated factors by the ids of their adapters. Weak: an entry lives while some patch uses it,
# and it holds its adapters, so the ids in its key cannot be reused by other objects meanwhile.
_FUSED: weakref.WeakValueDictionary[tuple[int, ...], FusedFactors] = weakref.WeakValueDictionary()


def fused_factors(adapters: Sequence[LoraAdapter]) -> FusedFactors:
    """The concatenated factors of these adapters, built once while any patch still uses them."""
    key = tuple(id(a) for a in adapters)
    found = _FUSED.get(key)
    if found is not None:
        return found
    pieces = []  # (up 2-D, down 2-D, scale): the file's tensors, or float32 for a Tucker mid
    for adapter in adapters:
        if adapter.mid is None:
            pieces.append((adapter.up.flatten(1), adapter.down.flatten(1), scale_of(adapter)))
        else:  # Tucker (LoCon with lora_mid): the mid folds into down, the scale into up
            up, down = scaled_factors(adapter)
            pieces.append((up, down, 1.0))
    dtypes = {t.dtype for up, down, _ in pieces for t in (up, down)}
    dtype = dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)).is_floating_point else torch.float32
    device = pieces[0][0].device
    ranks = tuple(down.shape[0] for _, down, _ in pieces)
    up_all = torch.empty(pieces[0][0].shape[0], sum(ranks), dtype=dtype, device=device)
    down_all = torch.empty(sum(ranks), pieces[0][1].shape[1], dtype=dtype, device=device)
    at = 0
    for (up, down, _), rank in zip(pieces, ranks, strict=True):
        up_all[:, at : at + rank].copy_(up)
        down_all[at : at + rank].copy_(down)
        at += rank
    fused = FusedFactors(tuple(adapters), up_all, down_all, ranks, tuple(scale for *_, scale in pieces))
    _FUSED[key] = fused
    return fused


def fuse_loras(terms: Sequence[Term]) -> FusedLora:
    """A run of plain LoRA terms as one product (the factors shared with other strengths)."""
    return FusedLora(fused_factors([t.adapter for t in terms]), tuple(float(t.strength) for t in terms))


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
            up, down, alpha = step.scaled(work.device)
            if work.is_contiguous():
                work.view(work.shape[0], -1).addmm_(up, down, alpha=alpha)  # (out, R) @ (R, in)
            else:
                work += (up @ down).reshape(work.shape) * alpha
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
