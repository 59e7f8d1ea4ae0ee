"""Loading a LoRA for a model: parse once (cached), resolve against the model's key maps, check
the base family, and plan the per-weight patches with strengths and block weights, plus the
report the user sees."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from .adapters import (
    Adapter,
    BoftAdapter,
    GloraAdapter,
    Ia3Adapter,
    LoraAdapter,
    OftAdapter,
    OftV2Adapter,
    SetAdapter,
    apply,
    boft_fit_error,
    delta,
    ia3_fit_error,
    oftv2_fit_error,
    peft_dora_fit_error,
    rank_of,
)
from .block_weights import BlockWeights, parse_block_weights
from .detect import FamilyGuess, detect_family, model_family_from_unet_config
from .formats import ParsedLora, parse_lora
from .keymap import resolve, summarize_unmatched
from .layouts import convert_layout
from .lorafile import read_lora_file
from .metadata import adapter_config_alphas, diffusers_alphas, trigger_words
from .patching import Term
from .te_names import naming_note

log = logging.getLogger("lora_foundry")
PARTS = ("unet", "clip")


# ComfyUI's model classes (comfy.supported_models), as the caller names them, to family labels.
_COMFY_MODEL_FAMILIES = {
    "SD15": "SD1.x", "SD15_instructpix2pix": "SD1.x",
    "SD20": "SD2.x", "SD21UnclipL": "SD2.x", "SD21UnclipH": "SD2.x",
    "SDXL": "SDXL", "SDXL_instructpix2pix": "SDXL", "SDXLRefiner": "SDXL Refiner",
    "SD3": "SD3", "Flux": "Flux", "FluxInpaint": "Flux", "FluxSchnell": "Flux",
}  # fmt: skip


def model_family(model_class: str, unet_config: Mapping[str, object]) -> FamilyGuess:
    """The model's family from the name of ComfyUI's model class, else from its unet_config."""
    if model_class in _COMFY_MODEL_FAMILIES:
        return FamilyGuess(_COMFY_MODEL_FAMILIES[model_class], f"ComfyUI detected {model_class}")
    return model_family_from_unet_config(unet_config)


class LoraMismatchError(ValueError):
    """The LoRA was made for another base model than the one it is applied to."""


@dataclass(frozen=True)
class LoadedLora:
    """A parsed LoRA file with what was read from its header."""

    path: str
    parsed: ParsedLora
    metadata: Mapping[str, str]
    family: FamilyGuess
    triggers: tuple[str, ...]

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


class _LoraCache:
    """Parsed files by (path, size, mtime): a strength change reads nothing from disk."""

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._items: OrderedDict[tuple, LoadedLora] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # files actually read, for tests and benchmarks

    def get(self, path: str) -> LoadedLora:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        config = _peft_config_path(path)
        if config is not None:  # its alphas are part of what is loaded
            cst = os.stat(config)
            key += (cst.st_size, cst.st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        loaded = _load(path)
        with self._lock:
            self.reads += 1
            self._items[key] = loaded
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return loaded


PEFT_CONFIG = "adapter_config.json"


def _peft_config_path(path: str) -> str | None:
    """The ``adapter_config.json`` PEFT saves beside an ``adapter_model`` file, if it is there."""
    if not os.path.basename(path).startswith("adapter_model"):
        return None
    config = os.path.join(os.path.dirname(path), PEFT_CONFIG)
    return config if os.path.isfile(config) else None


def _load(path: str) -> LoadedLora:
    f = read_lora_file(path)
    tensors, layout = convert_layout(f.tensors)
    config_text = None
    if (config := _peft_config_path(path)) is not None:
        try:
            with open(config, encoding="utf-8") as fh:
                config_text = fh.read()
        except (OSError, UnicodeDecodeError) as e:
            log.warning(
                "%s: could not read %s beside it (%s); alphas not taken from it", path, PEFT_CONFIG, e
            )
    parsed = _with_config_alphas(parse_lora(tensors), f.metadata, config_text)
    if layout is not None:
        parsed = replace(parsed, format=f"{parsed.format} ({layout} layout, renamed as ComfyUI does)")
    return LoadedLora(
        path=path,
        parsed=parsed,
        metadata=dict(f.metadata),
        family=detect_family(tensors, f.metadata),
        triggers=tuple(trigger_words(f.metadata)),
    )


def _with_config_alphas(
    parsed: ParsedLora, metadata: Mapping[str, str], config_text: str | None
) -> ParsedLora:
    """LoRA modules without an ``.alpha`` take the one their trainer's PEFT config gives, if the file
    carries it (diffusers' header) or PEFT saved it beside the file (``adapter_config.json``)."""
    ranks = {n: a.rank for n, a in parsed.modules.items() if isinstance(a, LoraAdapter) and a.alpha is None}
    alphas = diffusers_alphas(metadata, ranks)
    source = "the lora_alpha in the file's diffusers header (lora_adapter_metadata), as diffusers loads it"
    if not alphas and config_text is not None:
        alphas = adapter_config_alphas(config_text, ranks)
        source = f"the lora_alpha in the {PEFT_CONFIG} beside the file, as PEFT loads it"
    if not alphas:
        return parsed
    modules = {n: replace(a, alpha=alphas[n]) if n in alphas else a for n, a in parsed.modules.items()}
    note = f"{len(alphas)} modules scaled by {source}; ComfyUI core ignores it"
    return replace(parsed, modules=modules, notes=(*parsed.notes, note))


CACHE = _LoraCache()


def load_lora(path: str) -> LoadedLora:
    return CACHE.get(path)


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

    @property
    def total_matched(self) -> int:
        return sum(self.matched.values())

    def text(self) -> str:
        rank = f"rank {min(self.ranks)}" if self.ranks and min(self.ranks) == max(self.ranks) else (
            f"ranks {min(self.ranks)}-{max(self.ranks)}" if self.ranks else "rank n/a")  # fmt: skip
        lines = [
            f"{self.file}: {self.format}, {rank}",
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


def _shape_error(adapter: Adapter, shape: tuple[int, ...]) -> str | None:
    """Why ``adapter`` cannot patch a weight of ``shape``, or None. Shapes only: runs on 'meta'."""
    if isinstance(adapter, SetAdapter):
        ok = tuple(adapter.weight.shape) == shape
        return None if ok else f"set_weight {tuple(adapter.weight.shape)} vs weight {shape}"
    if isinstance(adapter, GloraAdapter):
        try:
            meta = GloraAdapter(
                *(t.to("meta") for t in (adapter.a1, adapter.a2, adapter.b1, adapter.b2)), adapter.alpha
            )
            apply(meta, torch.empty(shape, device="meta"))
        except (ValueError, RuntimeError) as e:
            return f"GLoRA: {e}"
        return None
    if isinstance(adapter, OftAdapter):
        num, size, size2 = adapter.blocks.shape
        ok = size == size2 and num * size == shape[0]
        return (
            None
            if ok
            else f"OFT blocks {tuple(adapter.blocks.shape)} do not cover the weight's {shape[0]} rows"
        )
    if isinstance(adapter, Ia3Adapter):
        return ia3_fit_error(adapter, shape)
    if isinstance(adapter, OftV2Adapter):
        return oftv2_fit_error(adapter, shape)
    if isinstance(adapter, BoftAdapter):
        error = boft_fit_error(tuple(adapter.blocks.shape), shape[0])
        rescale = adapter.rescale
        if error is None and rescale is not None:
            try:
                fits = torch.broadcast_shapes(tuple(rescale.shape), shape) == torch.Size(shape)
            except RuntimeError:
                fits = False
            if not fits:
                error = f"BOFT rescale {tuple(rescale.shape)} does not fit the weight {shape}"
        return error
    if isinstance(adapter, LoraAdapter) and adapter.reshape is not None:
        grown = tuple(adapter.reshape)
        if len(grown) != len(shape) or any(n < o for n, o in zip(grown, shape, strict=True)):
            return f"reshape_weight {grown} cannot hold the weight {shape}: it may only grow it"
        shape = grown
    if isinstance(adapter, LoraAdapter):
        if adapter.up.shape[0] != shape[0]:
            return f"LoRA up {tuple(adapter.up.shape)} has {adapter.up.shape[0]} outputs, the weight {shape} has {shape[0]}"
        error = peft_dora_fit_error(adapter, shape)
        if error:
            return error
        if adapter.mid is None and adapter.dora_scale is None:  # the common case, without a dry run
            inputs = math.prod(adapter.down.shape[1:])
            if inputs != math.prod(shape[1:]):
                return f"LoRA down {tuple(adapter.down.shape)} takes {inputs} inputs, the weight {shape} has {math.prod(shape[1:])}"
            return None
    plain = adapter
    if getattr(adapter, "dora_scale", None) is not None or getattr(adapter, "reshape", None) is not None:
        plain = replace(
            adapter, dora_scale=None, **({"reshape": None} if isinstance(adapter, LoraAdapter) else {})
        )
    try:
        delta(plain, shape, "meta")
    except (ValueError, RuntimeError) as e:
        return str(e)
    return None


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
) -> LoraPlan:
    """Resolve the LoRA against each part's key map and build its patch terms.

    Raises LoraMismatchError when nothing matches, the LoRA's base family differs from the
    model's, or a tensor's shape does not fit its weight (``weight_shapes``: part -> key ->
    shape); a partial match is reported (report.unmatched), not raised.
    """
    _check_layout(lora)
    _check_family(lora, model_family)
    bw: BlockWeights | None = (
        parse_block_weights(block_weights, model_family.family) if block_weights.strip() else None
    )
    modules: dict[str, Adapter] = dict(lora.parsed.modules)
    remaining = set(modules) | set(lora.parsed.bias_diffs)
    patches: dict[str, dict[object, tuple[Term, ...]]] = {}
    matched: dict[str, int] = {}
    renamed: list[str] = []  # text-encoder names transformers 5 wrote, read in their 4.x spelling
    for part, key_map in key_maps.items():
        res = resolve({n: modules.get(n) for n in remaining}, key_map)
        renamed += res.transformers5
        part_patches: dict[object, tuple[Term, ...]] = {}
        strength = strengths.get(part, 1.0)
        for name, target in res.matched.items():
            s = strength * (bw.weight_for(_target_key(target)) if bw else 1.0)
            if name in modules:
                _check_shape(lora, name, modules[name], target, (weight_shapes or {}).get(part))
                part_patches[target] = (Term(modules[name], s),)
            if name in lora.parsed.bias_diffs and (bias := _bias_target(target)) is not None:
                part_patches[bias] = (Term(lora.parsed.bias_diffs[name], s),)
        remaining -= set(res.matched)
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
        notes=lora.parsed.notes + naming_note(renamed),
    )
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
    key = _target_key(target)
    if shapes is None or key not in shapes or not isinstance(target, str):
        return  # offset targets patch a slice whose shape ComfyUI works out
    problem = _shape_error(adapter, tuple(shapes[key]))
    if problem:
        raise LoraMismatchError(
            f"{lora.name}: module {name} does not fit {key}: {problem}. "
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
        "applies, or not a LoRA at all: pick a LoRA, LoCon, LoHa, LoKr, OFT (LyCORIS or PEFT), BOFT, GLoRA, (IA)3, "
        "DoRA, diffusers or PEFT file."
    )


def _check_family(lora: LoadedLora, model: FamilyGuess) -> None:
    lf, mf = lora.family.family, model.family
    if "unknown" in (lf, mf) or lf == mf:
        return
    raise LoraMismatchError(
        f"{lora.name} is a {lf} LoRA ({lora.family.evidence}) but the model is {mf} "
        f"({model.evidence}). LoRAs only work on the base model family they were trained for: "
        f"pick a {mf} LoRA or a {lf} checkpoint."
    )
