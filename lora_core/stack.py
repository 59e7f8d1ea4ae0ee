"""LoRA stacks: entries with their own strengths, read from this pack's or other packs' LORA_STACK
lists, and the fusion of several LoRA plans into one patch per weight."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


class StackItem(tuple):
    """A LORA_STACK entry that other packs read as ``(lora_name, strength_model, strength_clip)``.

    It unpacks to those three values, as the common convention wants; ``block_weights`` rides
    along as an attribute that only this pack reads.
    """

    block_weights: str

    def __new__(cls, lora_name: str, strength_model: float, strength_clip: float, block_weights: str = ""):
        item = super().__new__(cls, (lora_name, float(strength_model), float(strength_clip)))
        item.block_weights = block_weights
        return item

    def __reduce__(self):  # keeps block_weights through copy/pickle
        return (StackItem, (*self, self.block_weights))


@dataclass(frozen=True)
class StackEntry:
    lora_name: str
    strength_model: float = 1.0
    strength_clip: float = 1.0
    block_weights: str = ""


def read_stack(items: Iterable | None) -> list[StackEntry]:
    """Entries from a LORA_STACK list: this pack's items, or other packs' 3-tuples (or longer)."""
    entries = []
    for i, item in enumerate(items or ()):
        if isinstance(item, StackEntry):
            entries.append(item)
            continue
        if not isinstance(item, (tuple, list)) or len(item) < 3 or not isinstance(item[0], str):
            raise ValueError(
                f"LORA_STACK entry {i} is {item!r}; expected (lora_name, strength_model, strength_clip)"
            )
        name, sm, sc = item[0], item[1], item[2]
        if name in ("", "None"):
            continue
        entries.append(StackEntry(name, float(sm), float(sc), getattr(item, "block_weights", "")))
    return entries


def to_stack_items(entries: Sequence[StackEntry]) -> list[StackItem]:
    return [StackItem(e.lora_name, e.strength_model, e.strength_clip, e.block_weights) for e in entries]


def fuse_patches(per_lora: Sequence[Mapping[object, tuple]]) -> dict[object, tuple]:
    """Concatenates each weight's terms across LoRAs, in stack order: one patch per weight."""
    fused: dict[object, tuple] = {}
    for patches in per_lora:
        for target, terms in patches.items():
            fused[target] = fused.get(target, ()) + tuple(terms)
    return fused
