"""What a LoRA's header says about it: trigger words, name, rank/alpha and training settings.

Headers are written by many tools (kohya ``ss_*``, modelspec) and are often malformed; nothing here
raises on bad metadata, it just leaves the field empty.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .adapters import Adapter, rank_of

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


def peft_alphas(config: Mapping[str, object], ranks: Mapping[str, int]) -> dict[str, float]:
    """Module name -> alpha (scale = alpha / rank, as for a kohya ``.alpha``) from a PEFT LoRA config
    whose keys carry the component the modules are named under: ``<component>.lora_alpha``,
    ``.alpha_pattern``, ``.use_rslora``, for modules named ``<component>.<path>``."""
    out: dict[str, float] = {}
    for name, rank in ranks.items():
        component, _, path = name.partition(".")
        alpha = _number(config.get(f"{component}.lora_alpha"))
        if alpha is None or not path:
            continue
        patterns = config.get(f"{component}.alpha_pattern")
        for key, value in (patterns if isinstance(patterns, dict) else {}).items():
            try:  # PEFT's rule (peft.utils.other.get_pattern_key): the key, as a regex, ends the path
                matched = re.match(rf"(.*\.)?({key})$", path)
            except re.error:
                continue
            if matched and _number(value) is not None:
                alpha = _number(value)
                break
        if config.get(f"{component}.use_rslora") is True:  # PEFT scales by alpha / sqrt(rank)
            alpha *= math.sqrt(rank)
        out[name] = alpha
    return out


def diffusers_alphas(metadata: Mapping[str, str], ranks: Mapping[str, int]) -> dict[str, float]:
    """Alphas from the PEFT config diffusers writes into a LoRA's header (``lora_adapter_metadata``,
    keys ``unet.lora_alpha``, ``text_encoder.lora_alpha``, ``transformer.``...). Without it a file is
    read at scale 1, as ComfyUI does; with it, as diffusers loads the file. A malformed header gives none."""
    config = _json(metadata.get("lora_adapter_metadata"))
    return peft_alphas(config, ranks) if isinstance(config, dict) else {}


def adapter_config_alphas(config_text: str, ranks: Mapping[str, int]) -> dict[str, float]:
    """Alphas from the ``adapter_config.json`` PEFT saves beside ``adapter_model.safetensors``, for
    the modules of that file (named ``base_model.model.<path>``). Malformed JSON gives none."""
    config = _json(config_text)
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        return {}
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
    words: list[str] = []
    phrase = metadata.get("modelspec.trigger_phrase")
    if isinstance(phrase, str):
        words += [p.strip() for p in phrase.split(",") if p.strip()]
    # Ties keep the header's order (Counter.most_common is stable), so the result is deterministic.
    words += [tag for tag, _ in tag_frequency(metadata).most_common()]
    seen: set[str] = set()
    unique = [w for w in words if not (w.lower() in seen or seen.add(w.lower()))]
    return unique[: max(limit, 0)]


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
