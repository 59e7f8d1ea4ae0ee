"""Per-block LoRA weights for DiT models (Flux, Flux.2, Chroma, SD3, Z-Image, Qwen-Image, Wan, HiDream, LTX-V).

A DiT's blocks sit in one or two lists, named here by group: ``double`` / ``single`` (Flux, Flux.2,
Chroma, HiDream, HunyuanVideo), ``joint`` (SD3), ``layer`` (Z-Image / Lumina 2), ``block`` (Wan,
Qwen-Image, LTX-V). How many blocks each group has is read from the model (DitBlocks); block indices
start at 0. Two spellings of a spec:
- readable: ``double=0.5, single0-10=1, single11-37=0, base=1, default=1``; a block or range beats
  its group whatever the order. ``base`` covers weights outside the block lists (embedders, final layer).
- a vector as the Inspire pack's LoRA Block Weight node reads it for Flux: BASE, then one number per
  block of each group in order (Flux: 1 + 19 double + 38 single = 58 numbers). Inspire counts the
  blocks the LoRA has; a vector here means the model's blocks, the same for a LoRA on every block.
  Inspire's readable form counts blocks from 1 (``double1-19``); this one from 0, as the model does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .block_weights import MAX_SPEC_CHARS

# ComfyUI's block list names -> group; the order is the vector order.
CONTAINERS = (
    ("double_blocks", "double"), ("double_stream_blocks", "double"), ("single_blocks", "single"),
    ("single_stream_blocks", "single"), ("joint_blocks", "joint"), ("layers", "layer"),
    ("transformer_blocks", "block"), ("blocks", "block"),
)  # fmt: skip
_GROUP_ORDER = ("double", "single", "joint", "layer", "block")


@dataclass(frozen=True)
class DitBlocks:
    """Blocks per group of the model, e.g. {"double": 19, "single": 38}."""

    counts: Mapping[str, int]

    def describe(self) -> str:
        return ", ".join(f"{g}0-{n - 1}" for g, n in self.counts.items()) or "no blocks"


def block_of(key: str) -> tuple[str, int] | None:
    """(group, index) of the DiT block a model key (``diffusion_model.double_blocks.3.img_attn.qkv.weight``)
    belongs to, else None (BASE)."""
    path = key.removeprefix("diffusion_model.")
    for container, group in CONTAINERS:
        if path.startswith(container + "."):
            index = path[len(container) + 1 :].split(".", 1)[0]
            return (group, int(index)) if index.isdigit() and len(index) <= 4 else None
    return None


@dataclass(frozen=True)
class DitBlockWeights:
    blocks: dict[tuple[str, int], float] = field(default_factory=dict)
    groups: dict[str, float] = field(default_factory=dict)
    base: float | None = None
    default: float = 1.0
    layout: str = "readable"

    def weight_for(self, key: str) -> float:
        block = block_of(key)
        if block is None:
            return self.default if self.base is None else self.base
        if block in self.blocks:
            return self.blocks[block]
        return self.groups.get(block[0], self.default)


def _number(text: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(
            f"`block_weights`: {item!r} does not give a finite number; use weights such as 0, 0.5 or 1"
        )
    return value


def _index(text: str, group: str, blocks: DitBlocks, item: str) -> int:
    n = blocks.counts[group]
    if not text.isdigit() or len(text) > 4 or int(text) >= n:
        raise ValueError(
            f"`block_weights` entry {item[:40]!r}: {group}{text[:8]} is not a block of this model; its blocks are "
            f"{blocks.describe()}"
        )
    return int(text)


def _parse_item(item: str, blocks: DitBlocks, out: DitBlockWeights) -> None:
    name, sep, value_text = item.partition("=")
    name = name.strip().lower()
    if not sep:
        raise ValueError(
            f"`block_weights`: cannot read {item[:40]!r}; expected items like double=0.5, single0-10=1"
        )
    value = _number(value_text.strip(), item)
    if name in ("base", "default"):
        object.__setattr__(out, name, value)
        return
    group = name.rstrip("0123456789-")
    if group not in blocks.counts:
        known = ", ".join(blocks.counts) or "none"
        raise ValueError(
            f"`block_weights`: {item[:40]!r} names no block group of this model; its groups are {known} "
            f"({blocks.describe()}), plus base= and default="
        )
    numbers = name[len(group) :]
    if not numbers:
        out.groups[group] = value
        return
    first, dash, last = numbers.partition("-")
    lo = _index(first, group, blocks, item)
    hi = _index(last, group, blocks, item) if dash else lo
    for i in range(lo, hi + 1):
        out.blocks[(group, i)] = value


def parse_dit_block_weights(spec: str, blocks: DitBlocks) -> DitBlockWeights:
    """A readable spec or an Inspire-style vector, checked against the model's blocks."""
    if len(spec) > MAX_SPEC_CHARS:
        raise ValueError(
            f"`block_weights` is {len(spec)} characters long; a block spec is at most {MAX_SPEC_CHARS}"
        )
    text = spec.strip().lstrip("%")
    if "=" in text:
        out = DitBlockWeights()
        for item in (p for p in text.split(",") if p.strip()):
            _parse_item(item.strip(), blocks, out)
        return out
    return _parse_vector(text.partition(":")[2] if ":" in text else text, blocks)


def _parse_vector(text: str, blocks: DitBlocks) -> DitBlockWeights:
    order = [(g, i) for g in _GROUP_ORDER for i in range(blocks.counts.get(g, 0))]
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 1 + len(order):
        raise ValueError(
            f"block weights for this model need {1 + len(order)} numbers (BASE, then {blocks.describe()}), "
            f"got {len(parts)}; or use the form 'double=0.5, single0-10=1'"
        )
    values = [_number(p, p) for p in parts]
    return DitBlockWeights(blocks=dict(zip(order, values[1:], strict=True)), base=values[0], layout="vector")


def count_blocks(keys) -> DitBlocks:
    """The groups' block counts from a model's weight keys (``diffusion_model.<list>.<i>....``)."""
    seen: dict[str, set[int]] = {}
    for key in keys:
        block = block_of(key)
        if block is not None:
            seen.setdefault(block[0], set()).add(block[1])
    return DitBlocks({g: max(seen[g]) + 1 for g in _GROUP_ORDER if g in seen})


def parse_for_model(spec: str, family: str, unet_keys) -> object | None:
    """The block weights a spec gives a model: DiT ones when the model's keys (``unet_keys``) show DiT
    block lists and no UNet blocks, else the UNet kind (lora_core.block_weights); None for no spec."""
    from .block_weights import parse_block_weights

    if not spec.strip():
        return None
    keys = list(unet_keys or ())
    if keys and not any(".input_blocks." in k or k.startswith("input_blocks.") for k in keys):
        blocks = count_blocks(keys)
        if blocks.counts:
            return parse_dit_block_weights(spec, blocks)
    return parse_block_weights(spec, family)
