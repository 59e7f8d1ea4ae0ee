"""What a LoRA's header says about it: trigger words, name, rank/alpha and training settings.

Headers are written by many tools (kohya ``ss_*``, modelspec) and are often malformed; nothing here
raises on bad metadata, it just leaves the field empty.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..adapters import Adapter, rank_of
from .peft_patterns import AlphaPatterns, read_alpha_pattern

DEFAULT_TRIGGER_LIMIT = 10
_TRAINING_KEYS = {
    "network_module": "ss_network_module",
    "learning_rate": "ss_learning_rate",
    "unet_lr": "ss_unet_lr",
    "text_encoder_lr": "ss_text_encoder_lr",
    "max_train_steps": "ss_max_train_steps",
    "epochs": "ss_num_epochs",
    "resolution": "ss_resolution",
    "optimizer": "ss_optimizer",
    "lr_scheduler": "ss_lr_scheduler",
    "mixed_precision": "ss_mixed_precision",
    "min_snr_gamma": "ss_min_snr_gamma",
    "train_images": "ss_num_train_images",
    "base_model": "ss_base_model_version",
}


# What of a header the pack reads (the rest is dropped as the file is read), and how much of it.
# Kohya's ss_tag_frequency (and ss_datasets, which repeats it per data set) grows with the data
# set: ~0.2 MB for 100k images tagged from a 10k-tag vocabulary, ~13 MB for 100k images with
# natural-language captions (every comma-separated fragment a "tag"); other values are short.
USED_PREFIXES = ("ss_", "modelspec.")
USED_KEYS = ("lora_adapter_metadata",)
MAX_TAG_VALUE = 32 * 2**20  # characters, for the keys below
_TAG_KEYS = ("ss_tag_frequency", "ss_datasets")
MAX_VALUE = 2**20  # characters, every other value (a PEFT config of a large model is ~100 kB)
MAX_TOTAL = 40 * 2**20  # characters of keys and values together
MAX_KEYS = 1024  # kohya writes ~60 ss_* keys and modelspec ~15; each kept key costs ~100 bytes more


@dataclass(frozen=True)
class HeaderMetadata:
    """The header metadata the pack keeps, and the used keys dropped for their size."""

    kept: dict[str, str]
    dropped: tuple[tuple[str, int], ...] = ()  # (key, characters)


def bounded_metadata(raw: Mapping[object, object]) -> HeaderMetadata:
    """The keys the pack reads, each value and the sum capped; numbers become text, anything
    else (lists, objects: never written by the tools that write these keys) is left out."""
    kept: dict[str, str] = {}
    dropped: list[tuple[str, int]] = []
    total = 0
    for key, value in raw.items():
        if not isinstance(key, str) or not (key.startswith(USED_PREFIXES) or key in USED_KEYS):
            continue
        if isinstance(value, (int, float)):  # bool too: str(True) is what a tool meant
            value = str(value)
        if not isinstance(value, str):
            continue
        cap = MAX_TAG_VALUE if key in _TAG_KEYS else MAX_VALUE
        size = len(key) + len(value)
        if len(value) > cap or total + size > MAX_TOTAL or len(kept) >= MAX_KEYS:
            dropped.append((key, len(value)))
            continue
        kept[key] = value
        total += size
    return HeaderMetadata(kept, tuple(dropped))


@dataclass(frozen=True)
class LoraInfo:
    name: str
    triggers: tuple[str, ...]
    rank: int | None
    alpha: float | None
    training: dict[str, str] = field(default_factory=dict)  # readable name -> header value


def _json(text: object) -> object:
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


@dataclass(frozen=True)
class ConfigAlphas:
    """Alphas a PEFT config gives modules (name -> alpha), and notes on what of it was not used."""

    alphas: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _pattern_path(component: str, path: str) -> str:
    """The module path PEFT's patterns see: its name inside the model the adapter was added to
    (PEFT's own files name a module ``base_model.model.<path>``)."""
    return path[len("model.") :] if component == "base_model" and path.startswith("model.") else path


def peft_alphas(config: Mapping[str, object], ranks: Mapping[str, int]) -> ConfigAlphas:
    """Module name -> alpha (scale = alpha / rank, as for a kohya ``.alpha``) from a PEFT LoRA config
    whose keys carry the component the modules are named under: ``<component>.lora_alpha``,
    ``.alpha_pattern``, ``.use_rslora``, for modules named ``<component>.<path>``. Pattern keys are
    matched as PEFT means them (lora_core.files.peft_patterns), never run as regular expressions."""
    out: dict[str, float] = {}
    patterns: dict[str, AlphaPatterns] = {}
    for name, rank in ranks.items():
        component, _, path = name.partition(".")
        alpha = _number(config.get(f"{component}.lora_alpha"))
        if alpha is None or not path:
            continue
        if component not in patterns:
            raw = config.get(f"{component}.alpha_pattern")
            patterns[component] = read_alpha_pattern(raw if isinstance(raw, dict) else {}, _number)
        pattern_alpha = patterns[component].alpha_for(_pattern_path(component, path))
        alpha = alpha if pattern_alpha is None else pattern_alpha
        if config.get(f"{component}.use_rslora") is True:  # PEFT scales by alpha / sqrt(rank)
            alpha *= math.sqrt(rank)
        if math.isfinite(alpha):  # 1e308 * sqrt(rank) is not
            out[name] = alpha
    skipped = [(c, k) for c, p in patterns.items() for k in p.skipped]
    return ConfigAlphas(out, (_skipped_note(skipped),) if skipped else ())


def _skipped_note(skipped: list[tuple[str, str]]) -> str:
    component, key = skipped[0]
    shown = key if len(key) <= 60 else key[:57] + "..."
    more = f" (and {len(skipped) - 1} more keys)" if len(skipped) > 1 else ""
    return (
        f"{component} alpha_pattern key {shown!r}{more} is a regular expression; the pack does not run "
        "expressions from files: the modules it would match keep lora_alpha"
    )


def diffusers_alphas(metadata: Mapping[str, str], ranks: Mapping[str, int]) -> ConfigAlphas:
    """Alphas from the PEFT config diffusers writes into a LoRA's header (``lora_adapter_metadata``,
    keys ``unet.lora_alpha``, ``text_encoder.lora_alpha``, ``transformer.``...). Without it a file is
    read at scale 1, as ComfyUI does; with it, as diffusers loads the file. A malformed header gives none."""
    config = _json(metadata.get("lora_adapter_metadata"))
    return peft_alphas(config, ranks) if isinstance(config, dict) else ConfigAlphas()


def adapter_config_alphas(config_text: str, ranks: Mapping[str, int]) -> ConfigAlphas:
    """Alphas from the ``adapter_config.json`` PEFT saves beside ``adapter_model.safetensors``, for
    the modules of that file (named ``base_model.model.<path>``). Malformed JSON gives none."""
    config = _json(config_text)
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        return ConfigAlphas()
    return peft_alphas({f"base_model.{k}": v for k, v in config.items()}, ranks)


def tag_frequency(metadata: Mapping[str, str]) -> Counter:
    """Tag counts summed over the datasets in ``ss_tag_frequency`` (empty if absent or malformed)."""
    counts: Counter = Counter()
    data = _json(metadata.get("ss_tag_frequency"))
    if not isinstance(data, dict):
        return counts
    for tags in data.values():
        if not isinstance(tags, dict):
            continue
        for tag, n in tags.items():
            if (
                isinstance(tag, str)
                and tag.strip()
                and isinstance(n, (int, float))
                and not isinstance(n, bool)
            ):
                counts[tag.strip()] += n
    return counts


def trigger_words(metadata: Mapping[str, str], limit: int = DEFAULT_TRIGGER_LIMIT) -> list[str]:
    """``modelspec.trigger_phrase`` first, then the most frequent training tags; no duplicates."""
    limit = max(limit, 0)
    words: list[str] = []
    phrase = metadata.get("modelspec.trigger_phrase")
    if isinstance(phrase, str):
        words += [p.strip() for p in phrase.split(",") if p.strip()]
    counts = tag_frequency(metadata)
    # Only the top few tags are needed: a partial sort (most_common(n) keeps the header's order on
    # ties, like the full sort), widened when duplicates of other spellings thin it out.
    wanted = limit + len(words)
    while True:
        top = [tag for tag, _ in counts.most_common(wanted)]
        unique = _unique(words + top)
        if len(unique) >= limit or wanted >= len(counts):
            return unique[:limit]
        wanted *= 2


def _unique(words: list[str]) -> list[str]:
    seen: set[str] = set()
    return [w for w in words if not (w.lower() in seen or seen.add(w.lower()))]


def _number(text: object) -> float | None:
    try:
        value = float(str(text))
    except (TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None


def _most_common(values: Iterable) -> object | None:
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def describe(metadata: Mapping[str, str], modules: Mapping[str, Adapter] | None = None) -> LoraInfo:
    """Name, triggers, rank and alpha (the most common over modules, else the header's) and training info."""
    modules = modules or {}
    rank = _most_common(rank_of(a) for a in modules.values())
    if rank is None and (dim := _number(metadata.get("ss_network_dim"))) is not None:
        rank = int(dim)
    alpha = _most_common(getattr(a, "alpha", None) for a in modules.values())
    if alpha is None:
        alpha = _number(metadata.get("ss_network_alpha"))
    name = metadata.get("ss_output_name") or metadata.get("modelspec.title") or ""
    training = {
        k: str(metadata[v]) for k, v in _TRAINING_KEYS.items() if metadata.get(v) not in (None, "", "None")
    }
    return LoraInfo(
        name=str(name),
        triggers=tuple(trigger_words(metadata)),
        rank=rank,
        alpha=alpha,
        training=training,
    )
