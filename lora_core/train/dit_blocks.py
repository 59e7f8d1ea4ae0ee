"""Block selection for DiTs in the family's own numbering: 'double0-18, single0-37' (Flux, Chroma),
'joint0-23' (SD3), 'layer0-29' (Lumina2 / Z-Image), 'block0-59' (Qwen-Image, Wan).

The counts come from the model (its block lists, handed over by the bridge), so a range past the
model's last block is an error naming the valid range, never a silent empty selection.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..apply.block_weights import check_spec_length
from .network import Target

# ComfyUI's block-list attribute -> the name a block spec uses for it.
GROUPS = {"double_blocks": "double", "single_blocks": "single", "joint_blocks": "joint", "layers": "layer",
          "transformer_blocks": "block", "blocks": "block", "double_stream_blocks": "double",
          "single_stream_blocks": "single", "noise_refiner": "noise_refiner", "context_refiner": "context_refiner"}  # fmt: skip
_PATH = re.compile(r"(?:^|\.)(" + "|".join(GROUPS) + r")\.(\d+)\.")
_ENTRY = re.compile(r"([a-z_]+?)(\d+)(?:-(\d+))?")


def group_counts(list_lengths: Mapping[str, int]) -> dict[str, int]:
    """{'double_blocks': 19, 'single_blocks': 38} -> {'double': 19, 'single': 38}."""
    return {GROUPS[k]: int(n) for k, n in list_lengths.items() if k in GROUPS and n > 0}


def block_of(path: str) -> tuple[str, int] | None:
    """('double', 3) for diffusion_model.double_blocks.3.img_attn.qkv; None outside the blocks."""
    m = _PATH.search(path)
    return (GROUPS[m[1]], int(m[2])) if m else None


def parse_dit_blocks(spec: str, counts: Mapping[str, int]) -> set[tuple[str, int]] | None:
    """'double0-3, single5' -> {('double', 0), ..., ('single', 5)}; empty -> None (every block)."""
    check_spec_length(spec, "blocks")
    text = spec.strip().lower()
    if not text:
        return None
    usage = ", ".join(f"{g}0-{n - 1}" for g, n in counts.items())
    chosen: set[tuple[str, int]] = set()
    for part in re.split(r"[,\s]+", text):
        if not part:
            continue
        if part in counts:
            chosen |= {(part, i) for i in range(counts[part])}
            continue
        m = _ENTRY.fullmatch(part)
        if m is None or m[1] not in counts:
            raise ValueError(
                f"`blocks` entry {part[:40]!r} is not a block of this model: its blocks are {usage}"
            )
        lo, hi = int(m[2]), int(m[3] if m[3] is not None else m[2])
        lo, hi = min(lo, hi), max(lo, hi)
        if hi >= counts[m[1]]:
            raise ValueError(
                f"`blocks` entry {part[:40]!r} is past the model's last block: its blocks are {usage}"
            )
        chosen |= {(m[1], i) for i in range(lo, hi + 1)}
    return chosen


def in_blocks(targets: Iterable[Target], wanted: set[tuple[str, int]] | None) -> list[Target]:
    """The targets inside the wanted blocks (all of them when ``wanted`` is None)."""
    return [t for t in targets if wanted is None or block_of(t.path) in wanted]
