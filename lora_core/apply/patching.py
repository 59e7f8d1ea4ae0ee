"""Applying several adapters to one weight in a single pass (the fused stack patch).

A run of plain LoRAs becomes one GEMM over concatenated factors,
``[s1*B1 | s2*B2 | ...] @ [A1; A2; ...]``, other linear adapters (LoHa, LoKr, full diffs) are
added in the same pass, and adapters that are not a plain sum (DoRA, set_weight) are applied in
their place in the order given, so the result equals applying the terms one after another.

Two ways to run the steps: ``apply_steps_`` on a float32 working copy (the one-time patch on
0.3.x), and ``apply_steps_half_`` on a float16 / bfloat16 weight in place, for the patch ComfyUI
runs at every forward in the model's dtype (and, since 0.8, the one-time patch on GPUs): no
float32 copy of the weight, each run of LoRAs GEMMs in that dtype (float32 accumulation) or in
float32 blocks of rows, one rounding per element, temporaries under a byte budget.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ..adapters import Adapter, DiffAdapter, LoraAdapter, apply, delta, is_linear, scale_of, scaled_factors

# Weight dtypes the in-place path computes in: GEMMs in them accumulate in float32 (CPU, and CUDA
# for bfloat16; for float16, unless PyTorch's reduced-precision reduction setting allows cuBLAS
# to reduce split-K partial sums in float16).
HALF_DTYPES = (torch.float16, torch.bfloat16)


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

    @property
    def coefficient(self) -> float | None:
        """The one coefficient (scale * strength) shared by every term, or None when they differ."""
        return self._coefficients[0] if len(set(self._coefficients)) == 1 else None

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


def sums_only(steps: Sequence[Step]) -> bool:
    """True when every step only adds a change (LoRA runs, LoHa, LoKr, full diffs): the steps that
    ``apply_steps_half_`` takes. DoRA, OFT, GLoRA, (IA)3, set_weight and reshapes need float32."""
    return all(isinstance(s, FusedLora) or is_linear(s.adapter) for s in steps)


def apply_steps_half_(
    steps: Sequence[Step], work: Tensor, compute: torch.dtype | None = None, budget: int | None = None
) -> Tensor:
    """Adds ``sums_only`` steps to ``work`` (float16 / bfloat16) in place, without a float32 copy of it.

    ``compute`` is the dtype of the LoRA products: ``work``'s own (the default; GEMMs straight into
    ``work``, accumulating in float32) or float32 (the factors kept exact, ``work`` taken a block of
    rows at a time into float32 and written back). Either way each element of ``work`` is rounded
    once per run of LoRAs (in ``work``'s dtype, once per block of ranks when the factors must be
    split, see ``lora_blocks``), each term's coefficient folded into ``up`` in float32. Temporaries stay under
    ``budget`` bytes (default: ``work``'s own size). A full diff is added as it is; LoHa / LoKr terms
    build their dense float32 change first (beyond the budget). Returns ``work``.
    """
    compute = work.dtype if compute is None else compute
    if work.dtype not in HALF_DTYPES or compute not in (work.dtype, torch.float32) or not sums_only(steps):
        raise ValueError(
            f"apply_steps_half_ takes sums on float16 / bfloat16 weights computed in their dtype or float32, "
            f"got a {work.dtype} weight and {compute}"
        )
    budget = work.numel() * work.element_size() if budget is None else budget
    for step in steps:
        if isinstance(step, FusedLora):
            _add_lora_run_(work, step, compute, budget)
        elif isinstance(step.adapter, DiffAdapter):
            diff = step.adapter.diff
            if tuple(diff.shape) != tuple(work.shape):
                raise ValueError(
                    f"diff has shape {tuple(diff.shape)} but the target weight is {tuple(work.shape)}"
                )
            work.add_(diff.to(work.device), alpha=step.strength)  # mixed dtypes: float32 math, one rounding
        else:
            work.add_(delta(step.adapter, tuple(work.shape), work.device), alpha=step.strength)
    return work


@dataclass(frozen=True)
class Blocks:
    """How ``_add_lora_run_`` splits one run's GEMM: ranks per block, rows per GEMM within a block."""

    ranks: int
    rows: int


def _copy_bytes(factor: Tensor, dtype: torch.dtype, moved: bool, fold: bool = False) -> int:
    """Bytes per element that turning ``factor`` into a ``dtype`` operand allocates: its copy on the
    weight's device, the cast, and with ``fold`` the float32 product with the coefficients."""
    size = torch.finfo(dtype).bits // 8
    if fold:
        return (factor.element_size() if moved else 0) + 4 + (size if dtype != torch.float32 else 0)
    if moved:
        return factor.element_size() + (size if factor.dtype != dtype else 0)
    return size if factor.dtype != dtype else 0


def lora_blocks(
    fused: FusedLora, shape: tuple[int, int], dtype: torch.dtype, compute: torch.dtype, device, budget: int
) -> Blocks:
    """Blocks whose temporaries fit in ``budget`` bytes, for a ``dtype`` weight of ``shape`` (rows,
    cols) and products in ``compute``. Splitting rows costs no accuracy (each row is still rounded
    once), so ranks are split only when ``down`` alone, cast, would take more than half the budget
    (in a 2-byte dtype: a total rank above half the weight's rows; products in that dtype then
    round once per block of ranks, float32 ones still once)."""
    rows, cols = shape
    factors = fused.factors
    moved = factors.up.device != torch.device(device)
    total = factors.up.shape[1]
    per_rank = cols * _copy_bytes(factors.down, compute, moved)  # a row of down, as the GEMM takes it
    ranks = total if per_rank == 0 else min(total, max(1, budget // 2 // per_rank))
    per_row = ranks * _copy_bytes(factors.up, compute, moved, fold=fused.coefficient is None)
    if compute != dtype:
        per_row += cols * 4  # the float32 copy of the row itself
    left = budget - ranks * per_rank
    return Blocks(ranks, rows if per_row == 0 else min(rows, max(1, left // per_row)))


def _add_lora_run_(work: Tensor, fused: FusedLora, compute: torch.dtype, budget: int) -> None:
    """``work += up @ down`` of one run of LoRAs, products in ``compute``, a block of rows at a time
    (and within it a block of ranks at a time, when the factors must be split)."""
    rows = work.shape[0]
    flat = work.view(rows, -1) if work.is_contiguous() else work if work.dim() == 2 else None
    factors, device = fused.factors, work.device
    blocks = lora_blocks(fused, (rows, work[0].numel()), work.dtype, compute, device, budget)
    if flat is None:  # an N-D strided slice (no key map slices a conv): all rows at once
        blocks = Blocks(blocks.ranks, rows)
    starts = range(0, factors.up.shape[1], blocks.ranks)
    whole = factors.down.to(device=device, dtype=compute) if len(starts) == 1 else None  # cast once
    for row in range(0, rows, blocks.rows):
        part = (work if flat is None else flat)[row : row + blocks.rows]
        acc = part if compute == work.dtype else part.float()  # float32: one rounding, at the end
        for at in starts:
            ranks = slice(at, at + blocks.ranks)
            down = whole if whole is not None else factors.down[ranks].to(device=device, dtype=compute)
            up, alpha = _up_block(fused, factors.up[row : row + blocks.rows, ranks], ranks, compute, device)
            if flat is None:
                acc.add_((up @ down).reshape(acc.shape), alpha=alpha)
            else:
                acc.addmm_(up, down, alpha=alpha)  # (rows, r) @ (r, cols)
            del up, down  # freed before the next block is cast: never two alive at once
        if acc is not part:
            part.copy_(acc)
        del acc  # as above: the next block's float32 rows are not allocated beside these


def _up_block(
    fused: FusedLora, up: Tensor, ranks: slice, compute: torch.dtype, device
) -> tuple[Tensor, float]:
    """(a block of up as the GEMM takes it, the GEMM's alpha). One coefficient for all terms: it is
    the alpha, and up is only cast; else the coefficients are folded in float32 and rounded once."""
    up = up.to(device)
    if fused.coefficient is not None:
        return up.to(compute), fused.coefficient
    return (up * fused._per_column[ranks].to(device)).to(compute), 1.0
