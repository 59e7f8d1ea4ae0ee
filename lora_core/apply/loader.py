"""Loading a LoRA for a model: parse once (cached), resolve against the model's key maps, check
the base family, and plan the per-weight patches with strengths and block weights, plus the
report the user sees."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..adapters import Adapter, rank_of
from ..adapters.registry import either, names
from ..files.detect import FamilyGuess, model_family_from_unet_config
from ..files.families import accepts, by_comfy_class
from ..files.layouts_dit import with_aliases
from ..files.trainer_names import family_name, layout_label
from .block_weights_dit import parse_for_model
from .extremes import extreme_changes, extreme_note, limit_for
from .fit import shape_error, target_shape
from .keymap import resolve, summarize_unmatched

# Reading and caching moved to opening.py; its names stay reachable here for callers and tests.
from .opening import (  # noqa: F401
    CACHE,
    CACHE_ENV,
    DEFAULT_CACHE_MB,
    LoadedLora,
    _load,
    _LoraCache,
    cache_budget_bytes,
    load_lora,
)
from .patching import Term
from .te_names import naming_note

log = logging.getLogger("lora_foundry")
PARTS = ("unet", "clip")


def model_family(model_class: str, unet_config: Mapping[str, object]) -> FamilyGuess:
    """The model's family from the name of ComfyUI's model class, else from its unet_config."""
    if family := by_comfy_class(model_class):
        return FamilyGuess(family.label, f"ComfyUI detected {model_class}")
    return model_family_from_unet_config(unet_config)


class LoraMismatchError(ValueError):
    """The LoRA was made for another base model than the one it is applied to."""


@dataclass(frozen=True)
class LoadReport:
    file: str
    format: str
    lora_family: str
    model_family: str
    matched: Mapping[str, int]  # part -> modules matched
    unmatched: tuple[str, ...]
    unused_keys: tuple[str, ...]
    ranks: tuple[int, ...]
    notes: tuple[str, ...] = ()
    layout: str = ""  # trainer and key layout recognised (lora_core.files.trainer_names)

    @property
    def total_matched(self) -> int:
        return sum(self.matched.values())

    def text(self) -> str:
        rank = f"rank {min(self.ranks)}" if self.ranks and min(self.ranks) == max(self.ranks) else (
            f"ranks {min(self.ranks)}-{max(self.ranks)}" if self.ranks else "rank n/a")  # fmt: skip
        lines = [
            f"{self.file}: {self.format}, {rank}",
            *([f"layout: {self.layout}"] if self.layout else []),
            f"base: LoRA {self.lora_family}, model {self.model_family}",
            "matched: " + ", ".join(f"{part} {n}" for part, n in self.matched.items()),
        ]
        if self.unmatched:
            lines.append(f"NOT applied: {len(self.unmatched)} modules")
            lines += [f"  - {g}" for g in summarize_unmatched(self.unmatched)]
        if self.unused_keys:
            lines.append(f"unknown keys ignored: {len(self.unused_keys)} (e.g. {self.unused_keys[0]})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class LoraPlan:
    """Per-target patch terms for each part (unet, clip), and the report."""

    patches: Mapping[str, Mapping[object, tuple[Term, ...]]] = field(default_factory=dict)
    report: LoadReport | None = None
    strengths: Mapping[str, float] = field(default_factory=dict)


def _bias_target(target):
    """The bias key next to a weight key target (str or (key, offset) tuple)."""
    key = target if isinstance(target, str) else target[0]
    if not key.endswith(".weight"):
        return None
    bias = key[: -len(".weight")] + ".bias"
    return bias if isinstance(target, str) else (bias, *target[1:])


def _target_key(target) -> str:
    return target if isinstance(target, str) else target[0]


def plan_lora(
    lora: LoadedLora,
    key_maps: Mapping[str, Mapping[str, object]],
    strengths: Mapping[str, float],
    model_family: FamilyGuess,
    block_weights: str = "",
    weight_shapes: Mapping[str, Mapping[str, tuple[int, ...]]] | None = None,
    weight_dtypes: Mapping[str, torch.dtype | None] | None = None,
    model_class: str = "",
) -> LoraPlan:
    """Resolve the LoRA against each part's key map and build its patch terms.

    Raises LoraMismatchError when nothing matches, the LoRA's base family differs from the
    model's, or a tensor's shape does not fit its weight (``weight_shapes``: part -> key ->
    shape); a partial match is reported (report.unmatched), not raised. Modules whose change is
    beyond what the part's weights hold (``weight_dtypes``: part -> dtype; float16's range when
    not given) are named in the report's notes. ``model_class``: ComfyUI's, for the layout line.
    """
    _check_layout(lora)
    _check_family(lora, model_family)
    bw = parse_for_model(block_weights, model_family.family, (weight_shapes or {}).get("unet"))
    modules: dict[str, Adapter] = dict(lora.parsed.modules)
    remaining = set(modules) | set(lora.parsed.bias_diffs)
    patches: dict[str, dict[object, tuple[Term, ...]]] = {}
    matched: dict[str, int] = {}
    renamed: list[str] = []  # text-encoder names transformers 5 wrote, read in their 4.x spelling
    notes = list(lora.parsed.notes)
    for part, key_map in key_maps.items():
        shapes = (weight_shapes or {}).get(part)
        names = with_aliases(key_map, shapes) if part == "unet" else key_map
        res = resolve({n: modules.get(n) for n in remaining}, names)
        renamed += res.transformers5
        part_patches: dict[object, tuple[Term, ...]] = {}
        strength = strengths.get(part, 1.0)
        applied = []  # (module, adapter, strength, the shape it patches) for the overflow check
        for name, target in res.matched.items():
            s = strength * (bw.weight_for(_target_key(target)) if bw else 1.0)
            if name in modules:
                _check_shape(lora, name, modules[name], target, shapes)
                part_patches[target] = (Term(modules[name], s),)
                applied.append((name, modules[name], s, target_shape(target, shapes)))
            if name in lora.parsed.bias_diffs and (bias := _bias_target(target)) is not None:
                _check_shape(lora, name, lora.parsed.bias_diffs[name], bias, shapes)
                part_patches[bias] = (Term(lora.parsed.bias_diffs[name], s),)
                applied.append(
                    (f"{name} (bias)", lora.parsed.bias_diffs[name], s, target_shape(bias, shapes))
                )
        remaining -= set(res.matched)
        limit = limit_for((weight_dtypes or {}).get(part))
        if found := extreme_changes(applied, limit):
            notes.append(f"{part}: {extreme_note(found, limit)}")
        patches[part] = part_patches
        matched[part] = len(res.matched)
    report = LoadReport(
        file=lora.name,
        format=lora.parsed.format,
        lora_family=lora.family.family,
        model_family=model_family.family,
        matched=matched,
        unmatched=tuple(sorted(remaining)),
        unused_keys=lora.parsed.unused_keys,
        ranks=tuple(sorted({r for a in modules.values() if (r := rank_of(a)) is not None})),
        notes=tuple(notes) + naming_note(renamed),
        layout=layout_label([*modules, *lora.parsed.bias_diffs], lora.metadata,
                            family_name(model_class, "" if model_family.family == "unknown" else model_family.family)),
    )  # fmt: skip
    if report.total_matched == 0:
        raise LoraMismatchError(
            f"{lora.name} ({lora.parsed.format}, base {lora.family.family}) matched none of the "
            f"{model_family.family} model's layers: it was made for another model. "
            "Pick a LoRA trained for this checkpoint's base model."
        )
    if report.unmatched:
        log.warning(
            "[LoRA Foundry] %s: %d of %d modules did not match the model and were skipped (%s)",
            lora.name, len(report.unmatched), len(report.unmatched) + report.total_matched,
            "; ".join(summarize_unmatched(report.unmatched)[:4]),
        )  # fmt: skip
    return LoraPlan(patches=patches, report=report, strengths=dict(strengths))


def _check_shape(lora: LoadedLora, name: str, adapter: Adapter, target, shapes) -> None:
    shape = target_shape(target, shapes)
    if shape is None:
        return  # a weight the caller gave no shape for (tests, other packs' key maps)
    problem = shape_error(adapter, shape)
    if problem is None and getattr(adapter, "reshape", None) is not None and not isinstance(target, str):
        problem = "a LoRA that grows a weight (reshape_weight) cannot patch a slice of a fused one"
    if problem:
        raise LoraMismatchError(
            f"{lora.name}: module {name} does not fit {_target_key(target)}: {problem}. "
            "The file was made for another model (pick a LoRA for this checkpoint's base model) "
            "or is damaged (download it again)."
        )


def _check_layout(lora: LoadedLora) -> None:
    """A file none of whose keys is in a layout this pack reads: say so, rather than blaming the model."""
    if lora.parsed.modules or lora.parsed.bias_diffs or not lora.parsed.unused_keys:
        return
    keys = lora.parsed.unused_keys
    telling = sorted(keys, key=lambda k: k.endswith((".alpha", ".dora_scale")))  # alpha says nothing
    raise LoraMismatchError(
        f"{lora.name}: none of its {len(keys)} keys is in a LoRA layout this pack reads "
        f"(e.g. {', '.join(telling[:3])}). It may be a kind of adapter neither this pack nor ComfyUI "
        f"applies, or not a LoRA at all: pick a {either(names())} file (DoRA too; kohya, LyCORIS, diffusers "
        "or PEFT names)."
    )


def _check_family(lora: LoadedLora, model: FamilyGuess) -> None:
    lf, mf = lora.family.family, model.family
    if "unknown" in (lf, mf) or accepts(mf, lora.family.labels):
        return
    raise LoraMismatchError(
        f"{lora.name} is a {lf} LoRA ({lora.family.evidence}) but the model is {mf} "
        f"({model.evidence}). LoRAs only work on the base model family they were trained for: "
        f"pick a {mf} LoRA or a {lf} checkpoint."
    )
