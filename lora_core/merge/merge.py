"""Merging several LoRAs into one, per module: concat, svd, linear, ties, dare_ties, dare_linear.
(The TIES / DARE pruning and sign election are in prune.py; they are re-exported here.)

Each method is a stateless function on one module's terms (like peft's merge_utils); the
input factors are already scaled by alpha / rank and each term has a weight w_i. The exact
target of "concat" and "svd" is sum_i w_i * up_i @ down_i. "ties" and "dare_*" work on dense
(out, in) deltas per module (peft semantics) and re-factor with a truncated SVD.
Which methods accept DenseDelta terms (LoHa, LoKr, DoRA...): svd, ties, dare_ties, dare_linear.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ..adapters import LoraAdapter
from ..adapters.registry import dense_sums, either
from .lowrank import (
    DenseDelta,
    Factors,
    ModuleDelta,
    dense_svd,
    factored_fro,
    factored_svd,
    split_top,
    unflatten_conv,
)
from .prune import (  # noqa: F401 (re-exported)
    MajoritySign,
    dare_delta,
    disjoint_merge,
    magnitude_prune,
    random_prune,
    ties_delta,
)

# Option names typed, as peft types them; the tuples (for node lists and checks) come from the types.
MergeMethod = Literal["concat", "svd", "linear", "ties", "dare_ties", "dare_linear"]
DenseMethod = Literal["svd", "ties", "dare_ties", "dare_linear"]
METHODS: tuple[MergeMethod, ...] = get_args(MergeMethod)
DENSE_METHODS: tuple[DenseMethod, ...] = get_args(DenseMethod)


@dataclass(frozen=True)
class MergeInfo:
    """How one module merged. rel_error is ||result - target||_F / ||target||_F, where the
    target is the weighted sum for concat/svd/linear and the dense TIES/DARE delta otherwise."""

    method: str
    rank: int
    rel_error: float
    energy_kept: float
    approximate: bool
    dense: bool


@dataclass(frozen=True)
class Merged:
    up: torch.Tensor  # (out, rank)
    down: torch.Tensor  # (rank, in)
    info: MergeInfo

    def __iter__(self) -> Iterator[object]:
        yield self.up
        yield self.down
        yield self.info


def _check_terms(terms: Sequence[ModuleDelta], weights: Sequence[float]) -> None:
    if len(terms) == 0:
        raise ValueError("terms is empty: pass at least one LoRA term (Factors or DenseDelta) to merge")
    if len(weights) != len(terms):
        raise ValueError(
            f"weights has {len(weights)} entries for {len(terms)} terms: give one weight per LoRA"
        )
    first = terms[0].shape
    for index, term in enumerate(terms):
        if not isinstance(term, (Factors, DenseDelta)):
            raise ValueError(
                f"term {index} is a {type(term).__name__}: wrap it as Factors(up, down) or dense_term(delta)"
            )
        if term.shape != first:
            raise ValueError(
                f"term {index} has shape (out, in) {term.shape} but term 0 has {first}: "
                "all LoRAs merged into one module must target the same layer shape"
            )
        if term.kernel != terms[0].kernel:
            raise ValueError(
                f"term {index} has conv kernel {term.kernel} but term 0 has {terms[0].kernel}: "
                "LoRAs merged into one module must have the same kernel"
            )


def _check_rank(rank: int | None) -> int:
    if rank is None or isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}: pass e.g. rank=32")
    return rank


def _check_density(density: float) -> float:
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(
            f"density must be in (0, 1], got {density!r}: it is the fraction of entries kept, e.g. 0.5"
        )
    return float(density)


def _out_dtype(terms: Sequence[ModuleDelta], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    first = terms[0]
    return first.up.dtype if isinstance(first, Factors) else first.delta.dtype


def _refuse_dense(terms: Sequence[ModuleDelta], method: str) -> None:
    for index, term in enumerate(terms):
        if isinstance(term, DenseDelta):
            raise ValueError(
                f"term {index} is a dense delta ({either(dense_sums())}): method '{method}' needs LoRA "
                f"factors; use one of {', '.join(DENSE_METHODS)}"
            )


def _stacked(terms: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """[w1*B1 | w2*B2 | ...] and [A1; A2; ...] so that up @ down = sum w_i B_i A_i."""
    ups = [term.up.float() * float(w) for term, w in zip(terms, weights, strict=True)]  # (out, r_i) each
    downs = [term.down.float() for term in terms]  # (r_i, in) each
    return Factors(up=torch.cat(ups, dim=1), down=torch.cat(downs, dim=0), kernel=terms[0].kernel)


def _dense(term: ModuleDelta) -> torch.Tensor:
    if isinstance(term, DenseDelta):
        return term.delta.float()
    return term.up.float() @ term.down.float()  # (out, r) @ (r, in)


def concat(terms: Sequence[Factors], weights: Sequence[float], dtype: torch.dtype | None = None) -> Merged:
    """Exact merge: rank = sum of ranks, up = [w1*B1 | w2*B2 | ...], down = [A1; A2; ...]."""
    _check_terms(terms, weights)
    _refuse_dense(terms, "concat")
    out_dtype = _out_dtype(terms, dtype)
    stacked = _stacked(terms, weights)
    info = MergeInfo("concat", stacked.rank, rel_error=0.0, energy_kept=1.0, approximate=False, dense=False)
    return Merged(up=stacked.up.to(out_dtype), down=stacked.down.to(out_dtype), info=info)


def svd_merge(
    terms: Sequence[ModuleDelta], weights: Sequence[float], rank: int, dtype: torch.dtype | None = None
) -> Merged:
    """Best rank-`rank` approximation (Eckart-Young) of sum_i w_i B_i A_i.

    All-factor input never forms the (out, in) delta (QR of the stacked factors, SVD of the
    R x R core). A DenseDelta term makes the sum full rank, so then the dense sum is formed
    and a thin dense SVD taken. Exact when rank >= the total rank.
    """
    _check_terms(terms, weights)
    rank = _check_rank(rank)
    out_dtype = _out_dtype(terms, dtype)
    dense = any(isinstance(term, DenseDelta) for term in terms)
    if dense:
        total = sum(_dense(term) * float(w) for term, w in zip(terms, weights, strict=True))  # (out, in)
        svd = dense_svd(total)
    else:
        stacked = _stacked(terms, weights)  # type: ignore[arg-type]
        svd = factored_svd(stacked.up, stacked.down)
    factors, cut = split_top(svd, rank, out_dtype)
    info = MergeInfo(
        "svd", cut.rank, cut.rel_error, cut.energy_kept, approximate=cut.rel_error > 0, dense=dense
    )
    return Merged(up=factors.up, down=factors.down, info=info)


def linear(terms: Sequence[Factors], weights: Sequence[float], dtype: torch.dtype | None = None) -> Merged:
    """Weighted average of the factors themselves (equal ranks only); approximate.

    up = sum sign(w_i) sqrt|w_i| B_i, down = sum sqrt|w_i| A_i: each term's own product gets
    weight w_i, plus cross terms B_i A_j, which is why the result differs from the weighted sum.
    """
    _check_terms(terms, weights)
    _refuse_dense(terms, "linear")
    ranks = [term.rank for term in terms]
    if len(set(ranks)) > 1:
        raise ValueError(
            f"method 'linear' needs equal ranks, got ranks {ranks}; use 'concat' (exact) or 'svd' (any rank)"
        )
    out_dtype = _out_dtype(terms, dtype)
    roots = [abs(float(w)) ** 0.5 for w in weights]
    signs = [1.0 if float(w) >= 0 else -1.0 for w in weights]
    up = sum(term.up.float() * (s * r) for term, s, r in zip(terms, signs, roots, strict=True))  # (out, r)
    down = sum(term.down.float() * r for term, r in zip(terms, roots, strict=True))  # (r, in)
    exact = _stacked(terms, weights)
    error = factored_fro(torch.cat([up, -exact.up], dim=1), torch.cat([down, exact.down], dim=0))
    norm = factored_fro(exact.up, exact.down)
    rel = error / norm if norm > 0 else 0.0
    info = MergeInfo("linear", ranks[0], rel, energy_kept=float("nan"), approximate=True, dense=False)
    return Merged(up=up.to(out_dtype), down=down.to(out_dtype), info=info)


def _refactor(target: torch.Tensor, method: str, rank: int, dtype: torch.dtype) -> Merged:
    factors, cut = split_top(dense_svd(target), rank, dtype)
    info = MergeInfo(method, cut.rank, cut.rel_error, cut.energy_kept, approximate=True, dense=True)
    return Merged(up=factors.up, down=factors.down, info=info)


def ties(
    terms: Sequence[ModuleDelta],
    weights: Sequence[float],
    rank: int,
    density: float,
    majority_sign: MajoritySign = "total",
    dtype: torch.dtype | None = None,
) -> Merged:
    """TIES (trim by magnitude, elect sign, disjoint mean) on dense deltas, re-factored to `rank`."""
    _check_terms(terms, weights)
    rank, density = _check_rank(rank), _check_density(density)
    target = ties_delta([_dense(term) for term in terms], weights, density, majority_sign)
    return _refactor(target, "ties", rank, _out_dtype(terms, dtype))


def dare(
    terms: Sequence[ModuleDelta],
    weights: Sequence[float],
    rank: int,
    density: float,
    seed: int,
    elect_sign: bool = True,
    dtype: torch.dtype | None = None,
) -> Merged:
    """DARE (random drop, rescale by 1/density) on dense deltas, then TIES sign election
    (dare_ties, elect_sign=True) or a plain weighted sum (dare_linear); re-factored to `rank`."""
    _check_terms(terms, weights)
    rank, density = _check_rank(rank), _check_density(density)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    target = dare_delta([_dense(term) for term in terms], weights, density, generator, elect_sign)
    method = "dare_ties" if elect_sign else "dare_linear"
    return _refactor(target, method, rank, _out_dtype(terms, dtype))


@dataclass(frozen=True)
class ModuleReport:
    """Per-module outcome shown to the user: how many LoRAs touched it, final rank, error."""

    n_terms: int
    rank: int
    rel_error: float
    energy_kept: float
    approximate: bool


@dataclass(frozen=True)
class MergeResult:
    modules: dict[str, LoraAdapter]  # file-ready: conv factors reshaped back to 4-D, alpha = rank
    reports: dict[str, ModuleReport]
    empty: tuple[str, ...]  # modules no LoRA had (every entry None): not written


@dataclass(frozen=True)
class MergeSpec:
    """The method and its parameters, checked once for a whole file (peft-style config)."""

    method: MergeMethod
    rank: int | None = None
    conv_rank: int | None = None  # for 3x3 (non-1x1) conv modules, as kohya; None: use rank
    density: float = 1.0
    seed: int = 0
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.method not in ("concat", "linear"):
            _check_rank(self.rank)
            if self.conv_rank is not None:
                _check_rank(self.conv_rank)
        if self.method != "svd":
            _check_density(self.density)

    def rank_for(self, kernel: tuple[int, int] | None) -> int | None:
        if kernel is not None and kernel != (1, 1) and self.conv_rank is not None:
            return self.conv_rank
        return self.rank


def merge_terms(terms: Sequence[ModuleDelta], weights: Sequence[float], spec: MergeSpec, seed: int) -> Merged:
    """One module's terms (no None) merged with `spec`; seed is this module's DARE seed."""
    method, rank, dtype = spec.method, spec.rank_for(terms[0].kernel), spec.dtype
    if method == "concat":
        return concat(terms, weights, dtype)  # type: ignore[arg-type]
    if method == "linear":
        return linear(terms, weights, dtype)  # type: ignore[arg-type]
    if method == "svd":
        return svd_merge(terms, weights, rank, dtype)  # type: ignore[arg-type]
    if method == "ties":
        return ties(terms, weights, rank, spec.density, dtype=dtype)  # type: ignore[arg-type]
    return dare(terms, weights, rank, spec.density, seed, method == "dare_ties", dtype)  # type: ignore[arg-type]


def _merge_entry(name: str, entries: Sequence[ModuleDelta | None], weights: Sequence[float], spec: MergeSpec):
    if len(entries) != len(weights):
        raise ValueError(
            f"module '{name}' has {len(entries)} entries for {len(weights)} weights: "
            "give one entry per LoRA, None where a LoRA lacks the module"
        )
    terms = [t for t in entries if t is not None]
    used = [float(w) for t, w in zip(entries, weights, strict=True) if t is not None]
    if not terms:
        return None
    module_seed = (int(spec.seed) + zlib.crc32(name.encode())) % 2**63  # stable across runs and orders
    try:
        merged = merge_terms(terms, used, spec, module_seed)
    except ValueError as error:
        raise ValueError(f"module '{name}': {error}") from error
    up, down = unflatten_conv(Factors(merged.up, merged.down, kernel=terms[0].kernel))
    info = merged.info
    report = ModuleReport(len(terms), info.rank, info.rel_error, info.energy_kept, info.approximate)
    return LoraAdapter(up=up, down=down, alpha=float(info.rank)), report


def merge_modules(
    per_module: Mapping[str, Sequence[ModuleDelta | None]],
    weights: Sequence[float],
    method: MergeMethod,
    rank: int | None = None,
    conv_rank: int | None = None,
    density: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Merge every module; per_module[name][i] is LoRA i's term for that module or None.

    Returns file-ready modules (conv back to 4-D) with alpha = rank, i.e. stored scale 1,
    and a report per module. `rank` is required for svd/ties/dare_*; concat and linear keep
    their natural rank. DARE draws from a per-module seed derived from `seed` and the name.
    """
    spec = MergeSpec(method, rank, conv_rank, density, seed, dtype)
    if len(weights) == 0:
        raise ValueError("weights is empty: pass one weight per LoRA")
    modules: dict[str, LoraAdapter] = {}
    reports: dict[str, ModuleReport] = {}
    empty: list[str] = []
    for step, (name, entries) in enumerate(per_module.items(), start=1):
        outcome = _merge_entry(name, entries, weights, spec)
        if outcome is None:
            empty.append(name)
        else:
            modules[name], reports[name] = outcome
        if on_step is not None:
            on_step(step, len(per_module))
    return MergeResult(modules=modules, reports=reports, empty=tuple(empty))
