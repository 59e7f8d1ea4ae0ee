"""Which expert of a Wan 2.2 A14B pair a LoRA file was trained for (high-noise or low-noise), from its
metadata and its name, and the check that a pair of LoRA sides is not swapped.

Wan 2.2's two experts share one architecture (ComfyUI loads both as the same Wan model class), so
neither a model nor a LoRA's keys tell them apart. What does:

1. The timesteps the LoRA was trained on. musubi-tuner writes ``modelspec.timestep_range`` = "min,max"
   (0..1000) when trained with --min_timestep / --max_timestep, which its Wan 2.2 guide sets to
   875..1000 for the high-noise expert (900..1000 for i2v) and 0..875 (0..900) for the low-noise
   one; kohya-style ``ss_min_timestep`` / ``ss_max_timestep`` are read the same way. A range starting
   at 800 or above is high-noise; one ending at 900 or below is low-noise; one spanning both says
   nothing (a LoRA trained on every timestep fits either).
2. Else the file name, as people and trainers' templates name them: a word ``high`` / ``highnoise``
   / ``hn`` (``wan22_style_high_noise.safetensors``, ``styleHighNoise``, ``style_HN``) or
   ``low`` / ``lownoise`` / ``ln``. A name with both, or neither, says nothing.

Metadata outranks the name. Nothing from the file is executed or compiled: numbers are parsed with
``float`` and names split on non-letters.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

HIGH, LOW, UNKNOWN = "high-noise", "low-noise", "unknown"
HIGH_FROM = 800.0  # a trained range starting here or above: only the high-noise expert's timesteps
LOW_UNTIL = 900.0  # a trained range ending here or below: only the low-noise expert's
_HIGH_WORDS = frozenset({"high", "highnoise", "hn"})
_LOW_WORDS = frozenset({"low", "lownoise", "ln"})
_MAX_NAME = 255


@dataclass(frozen=True)
class NoiseSide:
    """The expert a LoRA file is for, and what said so (for the report and errors)."""

    side: str  # HIGH, LOW or UNKNOWN
    evidence: str


def _number(text: object) -> float | None:
    if not isinstance(text, str) or len(text) > 32:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and 0.0 <= value <= 1000.0 else None


def trained_range(metadata: Mapping[str, str]) -> tuple[float, float] | None:
    """(min, max) training timestep from the header, or None when it does not say (or says nonsense)."""
    text = metadata.get("modelspec.timestep_range")
    if isinstance(text, str) and text.count(",") == 1:
        lo, hi = (_number(part) for part in text.split(","))
    else:
        lo, hi = _number(metadata.get("ss_min_timestep")), _number(metadata.get("ss_max_timestep"))
    if lo is None or hi is None or lo > hi:
        return None
    return lo, hi


def _words(name: str) -> set[str]:
    """Lower-case words of a file name: split on anything not a letter or digit and at camelCase humps."""
    stem = os.path.splitext(os.path.basename(name[:_MAX_NAME]))[0]
    words, current = [], ""
    for i, ch in enumerate(stem):
        if not ch.isalnum():
            words.append(current)
            current = ""
            continue
        if (
            ch.isupper()
            and current
            and (current[-1].islower() or (i + 1 < len(stem) and stem[i + 1].islower()))
        ):
            words.append(current)
            current = ""
        current += ch
    words.append(current)
    lowered = [w.lower() for w in words if w]
    joined = {a + b for a, b in zip(lowered, lowered[1:], strict=False)}  # "high" "noise" -> "highnoise"
    return set(lowered) | joined


def noise_side(name: str, metadata: Mapping[str, str]) -> NoiseSide:
    """Which Wan 2.2 expert the file ``name`` with header ``metadata`` was trained for."""
    span = trained_range(metadata)
    if span is not None:
        lo, hi = span
        where = f"trained on timesteps {lo:g}-{hi:g}"
        if lo >= HIGH_FROM and hi > LOW_UNTIL:
            return NoiseSide(HIGH, where)
        if hi <= LOW_UNTIL and lo < HIGH_FROM:
            return NoiseSide(LOW, where)
    words = _words(name)
    high, low = bool(words & _HIGH_WORDS), bool(words & _LOW_WORDS)
    if high != low:
        side, word = (HIGH, sorted(words & _HIGH_WORDS)[0]) if high else (LOW, sorted(words & _LOW_WORDS)[0])
        return NoiseSide(side, f"its name says '{word}'")
    return NoiseSide(UNKNOWN, "neither its metadata nor its name tells")


def check_side(slot: str, expected: str, files: Sequence[tuple[str, Mapping[str, str]]]) -> list[str]:
    """Raises ValueError when a file of ``slot`` (the high- or low-noise side) was made for the other
    expert; returns one report line per file saying what was read."""
    other = LOW if expected == HIGH else HIGH
    lines = []
    for name, metadata in files:
        found = noise_side(name, metadata)
        if found.side == other:
            raise ValueError(
                f"{slot}: {os.path.basename(name)} is a {other} LoRA ({found.evidence}), on the {expected} "
                f"side: the pair looks swapped. Put it on the {other} side, or pick the {expected} file of the pair."
            )
        lines.append(f"{os.path.basename(name)}: {found.side} ({found.evidence})")
    return lines
