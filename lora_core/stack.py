"""LoRA stacks: entries with their own strengths, read from this pack's or other packs' LORA_STACK
lists, and the fusion of several LoRA plans into one patch per weight."""

from __future__ import annotations

import json
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


# The LoRA Stack node's JSON input, written by the frontend's row widget (web/js: same name).
ROWS = "rows_json"
ROW_FIELDS = ("lora", "on", "strength_model", "strength_clip", "block_weights")


def read_rows(text: str) -> list[StackEntry]:
    """Enabled entries from the row widget's JSON: [{"lora": ..., "on": ..., ...}, ...]."""
    if not text or not text.strip():
        return []
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f'{ROWS} is not valid JSON ({e}); expected a list of rows like {{"lora": "a.safetensors"}}'
        ) from e
    if not isinstance(rows, list):
        raise ValueError(f"{ROWS} must be a JSON list of rows, got {type(rows).__name__}")
    entries = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("lora"), str):
            raise ValueError(f"{ROWS} row {i} is {row!r}; each row needs at least a 'lora' file name")
        unknown = set(row) - set(ROW_FIELDS)
        if unknown:
            raise ValueError(
                f"{ROWS} row {i} has unknown fields {sorted(unknown)}; known: {', '.join(ROW_FIELDS)}"
            )
        if row["lora"] in ("", "None") or not row.get("on", True):
            continue
        try:
            sm, sc = float(row.get("strength_model", 1.0)), float(row.get("strength_clip", 1.0))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{ROWS} row {i}: strengths must be numbers ({e})") from e
        entries.append(StackEntry(row["lora"], sm, sc, str(row.get("block_weights", ""))))
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
