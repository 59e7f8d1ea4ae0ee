"""Baking a planned LoRA stack into one new kohya LoRA file: merge per weight, name modules with
kohya names taken from the model's own key map, and record where it came from in ss_* metadata."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..adapters import Adapter, LoraAdapter, delta, is_linear, scaled_factors
from ..adapters.registry import either, not_a_plain_sum
from ..apply.loader import LoraPlan
from ..apply.opening import LoadedLora
from ..budget import MemoryNeed, check_fits, factors_need
from ..files.families import by_label
from ..files.metadata import tag_frequency
from ..files.savefile import MergeSource, kohya_metadata, resolve_dtype, safe_output_name, save_lora
from .lowrank import DenseDelta, Factors
from .merge import MergeSpec, ModuleReport, merge_modules


def _merge_term(lora: LoadedLora, adapter: Adapter, shape: tuple[int, ...], key: str):
    kernel = tuple(shape[2:]) if len(shape) == 4 else None
    if not is_linear(adapter):
        raise ValueError(
            f"{lora.name} uses {either(not_a_plain_sum())} (or grows the weight) on {key}: that is not a sum of low-rank terms and cannot "
            "be merged into a LoRA file; apply it with Load LoRA / Apply LoRA Stack instead"
        )
    if isinstance(adapter, LoraAdapter):
        up, down = scaled_factors(adapter)
        return Factors(up, down, kernel)
    return DenseDelta(delta(adapter, shape).reshape(shape[0], -1), kernel)


@dataclass(frozen=True)
class BakeResult:
    path: str
    reports: Mapping[str, ModuleReport]
    notes: tuple[str, ...]

    def text(self, method: str) -> str:
        r = list(self.reports.values())
        ranks = sorted({x.rank for x in r})
        worst = max((x.rel_error for x in r), default=0.0)
        mean = sum(x.rel_error for x in r) / max(1, len(r))
        exact = worst < 1e-6 and not any(x.approximate for x in r)
        lines = [
            f"wrote {os.path.basename(self.path)}: {len(r)} modules, method {method}, "
            f"rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}",
            "exact: equals the stack" if exact else
            f"approximate: relative error per module mean {mean:.2e}, worst {worst:.2e} (Frobenius, vs the stack)",
        ]  # fmt: skip
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def bake_stack(
    loras: Sequence[LoadedLora],
    plans: Sequence[LoraPlan],
    names: Mapping[str, Mapping[str, str]],
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
    out_dir: str,
    output_name: str,
    spec: MergeSpec,
    family: str,
    dtype: str = "fp16",
    overwrite: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    available: int | None = None,
) -> BakeResult:
    """Merge the planned entries weight by weight (their strengths and block weights are the merge
    weights) and write a kohya LoRA atomically into ``out_dir``; returns the path and per-module report.

    names: part -> model key -> kohya module name; shapes: part -> model key -> weight shape.
    available: bytes of memory free for the merge; settings whose output clearly exceeds it are
    refused (budget.MemoryBudgetError) before any module is merged.
    """
    path = os.path.join(out_dir, safe_output_name(output_name))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another output_name or switch overwrite on")
    per_module, weights, notes = _collect(loras, plans, names, shapes)
    check_fits(merge_need(per_module, spec, dtype), available, "this machine")
    modules: dict[str, LoraAdapter] = {}
    reports: dict[str, ModuleReport] = {}
    for step, (name, terms) in enumerate(per_module.items(), start=1):
        result = merge_modules({name: terms}, weights[name], spec.method, spec.rank, spec.conv_rank,
                               spec.density, spec.seed)  # fmt: skip
        modules.update(result.modules)
        reports.update(result.reports)
        if on_step:
            on_step(step, len(per_module))
    if not modules:
        raise ValueError("nothing to merge: no entry touched any weight of the model")
    meta = _metadata(loras, plans, modules, spec, family, output_name)
    save_lora(path, modules, meta, resolve_dtype(dtype), overwrite=overwrite)
    return BakeResult(path=path, reports=reports, notes=tuple(notes))


def _output_rank(terms: Sequence, method: str, rank: int | None) -> int:
    """The rank merge_modules will give a module (see merge.py: concat sums ranks, linear keeps
    the common rank, the SVD-based methods cut at ``rank`` and at the matrix's own size)."""
    present = [t for t in terms if t is not None]
    d_out, d_in = present[0].shape
    factored = sum(t.rank for t in present if isinstance(t, Factors))
    all_factored = all(isinstance(t, Factors) for t in present)
    if method == "concat":
        return factored
    if method == "linear":
        return max((t.rank for t in present if isinstance(t, Factors)), default=0)
    cap = min(rank or 1, d_out, d_in)
    return min(cap, factored) if method == "svd" and all_factored else cap


def merge_need(per_module: Mapping[str, Sequence], spec: MergeSpec, dtype: str) -> MemoryNeed:
    """Floor of a merge's memory: every output module's factors (kept until the file is written)
    and the dense (out, in) work of the largest module for the dense methods."""
    out, peak = [], 0
    for terms in per_module.values():
        present = [t for t in terms if t is not None]
        if not present:
            continue
        d_out, d_in = present[0].shape
        out.append((d_out, d_in, _output_rank(terms, spec.method, spec.rank_for(present[0].kernel))))
        dense = spec.method in ("ties", "dare_ties", "dare_linear") or (
            spec.method == "svd" and not all(isinstance(t, Factors) for t in present)
        )
        if dense:  # the dense terms and the target, float32
            peak = max(peak, (len(present) + 1) * d_out * d_in * 4)
    rank_words = "the sum of the LoRAs' ranks" if spec.method == "concat" else f"`rank` {spec.rank}"
    return factors_need(
        out,
        dtype,
        peak,
        inputs=f"merging {len(out)} modules with method {spec.method} at {rank_words}",
        fix="lower `rank` (and `conv_rank`), use method svd instead of concat, or merge fewer LoRAs at once",
    )


def _split_target(target) -> tuple[str, tuple[int, int, int] | None, Callable | None]:
    """A key map target as (weight key, offset, function): a key, or (key, offset[, function])
    where offset = (dim, start, size) is the slice of a fused weight the module addresses."""
    if isinstance(target, str):
        return target, None, None
    return target[0], (target[1] if len(target) > 1 else None), (target[2] if len(target) > 2 else None)


def _lift(term, shape: tuple[int, ...], offset, function, name: str):
    """A term on a slice of a weight (or through a key map function) as a term on the whole weight,
    so a LoRA written for the parts of a fused weight (Flux's q, k, v of qkv) merges into it."""
    if function is not None:
        if isinstance(term, Factors):
            # Key map functions rearrange rows (Flux's norm_out swaps scale and shift): then they
            # commute with the product and apply to the up factor; checked on a random vector.
            try:
                up = function(term.up)
                probe = torch.randn(term.down.shape[1], generator=torch.Generator().manual_seed(0))
                mixed = term.down @ probe
                ok = up.shape == term.up.shape and torch.allclose(
                    up @ mixed, function((term.up @ mixed)[:, None])[:, 0], rtol=1e-4, atol=1e-6
                )
            except Exception:
                ok = False
            if not ok:
                raise ValueError(
                    f"{name}: the model's key map transforms this layer's change in a way a LoRA file cannot hold"
                )
            term = Factors(up, term.down, term.kernel)
        else:
            term = DenseDelta(function(term.delta), term.kernel)
    if offset is None:
        return term
    dim, start, size = offset
    if len(shape) != 2 or dim not in (0, 1):
        raise ValueError(f"{name}: a slice along dim {dim} of a {len(shape)}-D weight cannot be merged")
    if isinstance(term, Factors):
        if dim == 0:
            up = term.up.new_zeros(shape[0], term.rank)
            up[start : start + size] = term.up
            return Factors(up, term.down)
        down = term.down.new_zeros(term.rank, shape[1])
        down[:, start : start + size] = term.down
        return Factors(term.up, down)
    full = term.delta.new_zeros(shape)
    full.narrow(dim, start, size).copy_(term.delta)
    return DenseDelta(full)


def _combine(pieces: list[tuple[object, float]]):
    """One LoRA's terms on the same weight (its slices) as one term and one merge weight."""
    if len(pieces) == 1:
        return pieces[0]
    weight = max((s for _, s in pieces), key=abs)
    if weight == 0.0:
        return None, 0.0
    scaled = [(t, s / weight) for t, s in pieces]
    if all(isinstance(t, Factors) for t, _ in scaled):
        up = torch.cat([t.up * f for t, f in scaled], dim=1)
        return Factors(up, torch.cat([t.down for t, _ in scaled], dim=0), scaled[0][0].kernel), weight
    total = sum(f * (t.up @ t.down if isinstance(t, Factors) else t.delta) for t, f in scaled)
    return DenseDelta(total, scaled[0][0].kernel), weight


def _collect(loras, plans, names, shapes):
    per_module: dict[str, list] = {}
    weights: dict[str, list[float]] = {}
    notes: list[str] = []
    for part, part_names in names.items():
        by_key: dict[str, list] = {}
        for target in sorted({t for p in plans for t in p.patches.get(part, {})}, key=str):
            key = _split_target(target)[0]
            if key.endswith(".bias"):
                notes.append(f"bias change on {key} dropped: kohya LoRA files hold no bias")
                continue
            if key not in part_names:
                raise ValueError(
                    f"{key} has no kohya name in this model's key map: cannot be written as kohya LoRA"
                )
            by_key.setdefault(key, []).append(target)
        for key, targets in by_key.items():
            name, shape = part_names[key], tuple(shapes[part][key])
            terms, ws = [], []
            for lora, plan in zip(loras, plans, strict=True):
                pieces = []
                for target in targets:
                    entry = plan.patches.get(part, {}).get(target)
                    if entry is None:
                        continue
                    (term,) = entry
                    _, offset, function = _split_target(target)
                    sub = list(shape)
                    if offset is not None:
                        sub[offset[0]] = offset[2]
                    merged = _merge_term(lora, term.adapter, tuple(sub), name)
                    pieces.append((_lift(merged, shape, offset, function, name), term.strength))
                term, weight = _combine(pieces) if pieces else (None, 0.0)
                terms.append(term)
                ws.append(weight)
            per_module[name], weights[name] = terms, ws
    return per_module, weights, notes


def _metadata(loras, plans, modules, spec: MergeSpec, family: str, output_name: str) -> dict[str, str]:
    ranks = {m.rank for m in modules.values()}
    dim = next(iter(ranks)) if len(ranks) == 1 else "Dynamic"  # alpha = rank: stored scale 1
    freq: dict[str, dict[str, int]] = {}
    for lora in loras:
        counts = tag_frequency(lora.metadata)
        if counts:
            freq[lora.name] = dict(counts)
    sources = [
        MergeSource(lora.name, p.strengths.get("unet", 1.0)) for lora, p in zip(loras, plans, strict=True)
    ]
    base = by_label(family)
    meta = kohya_metadata(
        network_dim=dim,
        network_alpha=dim,
        base_model_version=base.base_model_version if base else None,
        output_name=output_name,
        tag_frequency=freq or None,
        merged_from=sources,
        merge_method=spec.method,
        merge_rank=spec.rank,
        merge_conv_rank=spec.conv_rank,
        modelspec_architecture=base.architecture if base else None,
    )
    meta["lora_foundry.strengths"] = json.dumps([p.strengths for p in plans])
    return meta
