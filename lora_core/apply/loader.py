"""Loading a LoRA for a model: parse once (cached), resolve against the model's key maps, check
the base family, and plan the per-weight patches with strengths and block weights, plus the
report the user sees."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from ..adapters import Adapter, LoraAdapter, rank_of
from ..adapters.registry import either, names
from ..files.detect import FamilyGuess, detect_family, model_family_from_unet_config
from ..files.families import by_comfy_class
from ..files.formats import ParsedLora, parse_lora
from ..files.layouts import convert_layout
from ..files.layouts_dit import with_aliases
from ..files.lorafile import LoraFileError, read_lora_file
from ..files.metadata import adapter_config_alphas, diffusers_alphas, trigger_words
from ..files.trainer_names import family_name, layout_label
from .block_weights_dit import parse_for_model
from .extremes import extreme_changes, extreme_note, limit_for
from .fit import shape_error, target_shape
from .keymap import resolve, summarize_unmatched
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
class LoadedLora:
    """A parsed LoRA file with what was read from its header."""

    path: str
    parsed: ParsedLora
    metadata: Mapping[str, str]
    family: FamilyGuess
    triggers: tuple[str, ...]
    nbytes: int = 0  # what it holds in memory: tensor bytes and header text, for the cache budget

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


CACHE_ENV = "LORA_FOUNDRY_PARSE_CACHE_MB"
DEFAULT_CACHE_MB = 1024


def cache_budget_bytes(environ: Mapping[str, str] = os.environ) -> int:
    """The parse cache's budget from ``LORA_FOUNDRY_PARSE_CACHE_MB`` (0 turns caching off)."""
    text = environ.get(CACHE_ENV, "").strip()
    try:
        mb = float(text) if text else DEFAULT_CACHE_MB
    except ValueError:
        mb = -1.0
    if not (0 <= mb < 2**40):  # also NaN
        log.warning("[LoRA Foundry] %s=%r is not a size in MB; using %d", CACHE_ENV, text, DEFAULT_CACHE_MB)
        mb = DEFAULT_CACHE_MB
    return int(mb * 2**20)


class _LoraCache:
    """Parsed files by (path, size, mtime): a strength change reads nothing from disk. Bounded by
    count and by bytes (LoadedLora.nbytes); a file larger than the whole budget is not kept."""

    def __init__(self, max_entries: int = 16, max_bytes: int | None = None):
        self.max_entries = max_entries
        self.max_bytes = cache_budget_bytes() if max_bytes is None else max_bytes
        self._items: OrderedDict[tuple, LoadedLora] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # files actually read, for tests and benchmarks

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(item.nbytes for item in self._items.values())

    def get(self, path: str) -> LoadedLora:
        key = _identity(path)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        loaded = _load(path)
        with self._lock:
            self.reads += 1
            if loaded.nbytes > self.max_bytes or key in self._items:
                return loaded
            self._items[key] = loaded
            total = sum(item.nbytes for item in self._items.values())
            while len(self._items) > self.max_entries or total > self.max_bytes:
                total -= self._items.popitem(last=False)[1].nbytes
        return loaded


def _identity(path: str) -> tuple:
    """The file as on disk (and the PEFT config beside it, whose alphas are part of what is loaded)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise LoraFileError(
            f"{os.path.basename(path)}: cannot be read ({e.strerror or e}); check that it is still in the "
            "loras folder"
        ) from None
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    config = _peft_config_path(path)
    try:
        cst = os.stat(config) if config is not None else None
    except OSError:  # removed meanwhile: loaded without it
        cst = None
    return key if cst is None else (*key, cst.st_size, cst.st_mtime_ns)


PEFT_CONFIG = "adapter_config.json"
MAX_CONFIG_CHARS = 4 * 2**20  # PEFT's config of a large model, with a pattern per module, is ~100 kB
_REDOWNLOAD = "download the file again (it may be incomplete or damaged)"


def _peft_config_path(path: str) -> str | None:
    """The ``adapter_config.json`` PEFT saves beside an ``adapter_model`` file, if it is there."""
    if not os.path.basename(path).startswith("adapter_model"):
        return None
    config = os.path.join(os.path.dirname(path), PEFT_CONFIG)
    return config if os.path.isfile(config) else None


def _read_config(path: str) -> str | None:
    if (config := _peft_config_path(path)) is None:
        return None
    try:
        with open(config, encoding="utf-8") as fh:
            text = fh.read(MAX_CONFIG_CHARS + 1)
    except (OSError, UnicodeDecodeError) as e:
        log.warning("%s: could not read %s beside it (%s); alphas not taken from it", path, PEFT_CONFIG, e)
        return None
    if len(text) > MAX_CONFIG_CHARS:
        log.warning(
            "%s: %s beside it is over %d characters; alphas not taken from it",
            path,
            PEFT_CONFIG,
            MAX_CONFIG_CHARS,
        )
        return None
    return text


def _load(path: str) -> LoadedLora:
    """The file read and parsed; whatever in it breaks the reading is a LoraFileError naming it."""
    name = os.path.basename(path)
    try:
        return _read_and_parse(path, name)
    except LoraFileError:
        raise
    except (ArithmeticError, LookupError, RuntimeError, ValueError) as e:  # RecursionError, UnicodeError...
        raise LoraFileError(
            f"{name}: could not be read as a LoRA ({type(e).__name__}: {str(e)[:200]}); {_REDOWNLOAD}"
        ) from e


def _read_and_parse(path: str, name: str) -> LoadedLora:
    f = read_lora_file(path)
    tensors, layout = convert_layout(f.tensors)
    parsed = parse_lora(tensors, source=name)
    parsed = _with_config_alphas(parsed, f.metadata, _read_config(path))
    if layout is not None:
        parsed = replace(parsed, format=f"{parsed.format} ({layout} layout, renamed as ComfyUI does)")
    if f.notes:
        parsed = replace(parsed, notes=(*f.notes, *parsed.notes))
    held = sum(t.numel() * t.element_size() for t in f.tensors.values())
    return LoadedLora(
        path=path,
        parsed=parsed,
        metadata=dict(f.metadata),
        family=detect_family(tensors, f.metadata),
        triggers=tuple(trigger_words(f.metadata)),
        nbytes=held + sum(len(v) for v in f.metadata.values()),
    )


def _with_config_alphas(
    parsed: ParsedLora, metadata: Mapping[str, str], config_text: str | None
) -> ParsedLora:
    """LoRA modules without an ``.alpha`` take the one their trainer's PEFT config gives, if the file
    carries it (diffusers' header) or PEFT saved it beside the file (``adapter_config.json``)."""
    ranks = {n: a.rank for n, a in parsed.modules.items() if isinstance(a, LoraAdapter) and a.alpha is None}
    read = diffusers_alphas(metadata, ranks)
    source = "the lora_alpha in the file's diffusers header (lora_adapter_metadata), as diffusers loads it"
    if not read.alphas and config_text is not None:
        read = adapter_config_alphas(config_text, ranks)
        source = f"the lora_alpha in the {PEFT_CONFIG} beside the file, as PEFT loads it"
    alphas = read.alphas
    notes = list(read.notes)
    if alphas:
        notes.insert(0, f"{len(alphas)} modules scaled by {source}; ComfyUI core ignores it")
    modules = {n: replace(a, alpha=alphas[n]) if n in alphas else a for n, a in parsed.modules.items()}
    return replace(parsed, modules=modules, notes=(*parsed.notes, *notes)) if notes else parsed


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
    if "unknown" in (lf, mf) or lf == mf:
        return
    raise LoraMismatchError(
        f"{lora.name} is a {lf} LoRA ({lora.family.evidence}) but the model is {mf} "
        f"({model.evidence}). LoRAs only work on the base model family they were trained for: "
        f"pick a {mf} LoRA or a {lf} checkpoint."
    )
