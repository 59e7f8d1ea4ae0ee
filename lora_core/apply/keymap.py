"""Resolving LoRA module names against a model's key map, trying the many spellings trainers use.

The key map comes from the caller (ComfyUI's ``model_lora_keys_unet`` / ``model_lora_keys_clip``):
it maps names such as ``lora_unet_...``, ``unet.<diffusers path>`` or ``diffusion_model.<path>``
to model weight keys. Targets are opaque here (a key, or a (key, offset) tuple).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from .te_names import te4_name

# Prefixes that tell which part of the model a module belongs to, longest first.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("unet.base_model.model.", "unet"),
    ("base_model.model.", "any"),  # PEFT: the part is not named, so every part is tried
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te1"),
    ("model.diffusion_model.", "unet"),
    ("diffusion_model.", "unet"),
    ("transformer.", "unet"),
    ("unet.", "unet"),
)
_UNDERSCORED = {
    "unet": ("lora_unet_", "lora_transformer_", "lycoris_"),
    "te1": ("lora_te_", "lora_te1_"),
    "te2": ("lora_te2_",),
}
_DOTTED = {
    "unet": ("unet.", "diffusion_model.", "transformer.", ""),
    "te1": ("text_encoder.", "text_encoders."),
    "te2": ("text_encoder_2.",),
}


@dataclass(frozen=True)
class Resolution:
    matched: dict[str, object]  # module name (file spelling) -> key-map target
    unmatched: tuple[str, ...]
    # matched names that only matched in their transformers 4 spelling (lora_core.apply.te_names)
    transformers5: tuple[str, ...] = ()


def _split_prefix(name: str) -> tuple[str, str] | None:
    for prefix, part in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :], part
    return None


def _plain_path(rest: str) -> str:
    """Old diffusers attention-processor names back to module paths (``processor.to_out`` is to_out.0)."""
    rest = rest.replace(".processor.", ".")
    if rest.endswith(".to_out"):
        rest += ".0"
    return rest


def _processor_path(path: str) -> str:
    """The spelling ComfyUI's key map uses for diffusers UNet attention (``attn1.processor.to_q``)."""
    path = path.replace(".to_", ".processor.to_")
    return path[:-2] if path.endswith(".to_out.0") else path


def candidates(name: str) -> Iterator[str]:
    """Spellings to try for one module name, the name itself first, then (for a text-encoder name
    transformers 5 wrote) those of its transformers 4 spelling."""
    yield from _spellings(name)
    renamed = te4_name(name)
    if renamed is not None:
        yield from _spellings(renamed)


def _spellings(name: str) -> Iterator[str]:
    yield name
    if name.startswith("lycoris_"):  # SimpleTuner's spelling of lora_unet_
        yield "lora_unet_" + name[len("lycoris_") :]
    split = _split_prefix(name)
    if split is None:
        return
    rest, part = split
    path = _plain_path(rest)
    parts = ("unet", "te1", "te2") if part == "any" else (part,)
    for p in parts:
        for prefix in _DOTTED[p]:
            yield prefix + path
            if p == "unet":
                yield prefix + _processor_path(path)
                if rest != path:  # a DiT's own "to_out" (HiDream) is no old attention-processor name
                    yield prefix + rest
        for prefix in _UNDERSCORED[p]:
            yield prefix + path.replace(".", "_")


def resolve(modules: Iterable[str] | Mapping[str, object], key_map: Mapping[str, object]) -> Resolution:
    """Match each module name (the keys of ``modules``) to a key-map target; the rest are unmatched."""
    matched: dict[str, object] = {}
    unmatched: list[str] = []
    renamed: list[str] = []
    for name in modules:
        target = _first(_spellings(name), key_map)
        if target is None and (te4 := te4_name(name)) is not None:
            target = _first(_spellings(te4), key_map)
            if target is not None:
                renamed.append(name)
        if target is None:
            unmatched.append(name)
        else:
            matched[name] = target
    return Resolution(matched=matched, unmatched=tuple(unmatched), transformers5=tuple(renamed))


def _first(spellings: Iterable[str], key_map: Mapping[str, object]) -> object | None:
    return next((key_map[c] for c in spellings if c in key_map), None)


_NUMBERED = re.compile(r"^(.*?[._])\d+(?=[._]|$)")


def summarize_unmatched(names: Iterable[str], max_lines: int = 8) -> list[str]:
    """Collapse names by the prefix before their first index: 'lora_unet_up_blocks_* (24 modules)'."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        m = _NUMBERED.match(name)
        groups[m.group(1) + "*" if m else name].append(name)
    counts = Counter({k: len(v) for k, v in groups.items()})
    lines = [f"{key} ({n} modules)" if n > 1 else groups[key][0] for key, n in counts.most_common(max_lines)]
    if len(counts) > max_lines:
        rest = sum(n for _, n in counts.most_common()[max_lines:])
        lines.append(f"... and {rest} more modules in {len(counts) - max_lines} other groups")
    return lines


# --- naming the modules of a file this pack writes -----------------------------------------

_DIFFUSERS_STYLE = ("down_blocks", "up_blocks", "mid_block", "text_model")


def kohya_names(key_map: Mapping[str, object], sgm_unet: bool = False) -> dict[str, str]:
    """Model weight key -> the kohya module name for it, as kohya's trainers write it: for the
    UNet, the diffusers-style path (SD1.x, SD2.x: sd-scripts trains them on diffusers' UNet) or,
    with ``sgm_unet`` (SDXL: sd-scripts trains it on its own SGM UNet), the SGM / LDM path
    (``lora_unet_input_blocks_4_1_...``), of the aliases ComfyUI's key map holds; with two text
    encoders (SDXL) ``lora_te1_`` / ``lora_te2_`` rather than the bare ``lora_te_`` ComfyUI also
    accepts."""
    two_encoders = any(isinstance(t, str) and t.startswith("clip_g.") for t in key_map.values())

    def rank(name: str) -> tuple[bool, bool]:
        te_ok = not name.startswith("lora_te") or name.startswith(("lora_te1_", "lora_te2_")) == two_encoders
        styled = any(s in name for s in _DIFFUSERS_STYLE)
        if sgm_unet and name.startswith("lora_unet_"):
            styled = not styled
        return styled, te_ok

    best: dict[str, str] = {}
    for name, target in key_map.items():
        if not isinstance(target, str) or not name.startswith(("lora_unet_", "lora_te")):
            continue
        if target not in best or rank(name) > rank(best[target]):
            best[target] = name
    return best
