"""LoRA stacks: entries with their own strengths, read from this pack's or other packs' LORA_STACK
lists, and the fusion of several LoRA plans into one patch per weight."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .block_weights import MAX_SPEC_CHARS

# Bounds on what one graph can ask for. Every row and stack entry keeps its parsed LoRA file
# alive until the patch is built (300 rows of a 1.7 MB LoRA held +0.8 GB); people stack a
# handful, rarely 20. The widget writes 100-400 bytes a row (a file name of up to 255 bytes and
# a block-weight spec); 2 KiB a row on average is generous, and the total is checked before the
# JSON parser sees it.
MAX_ROWS = 64
MAX_ROWS_BYTES = 128 * 1024
MAX_STACK_ENTRIES = 256  # a LORA_STACK from chained stacks or another pack


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
    items = list(items or ())
    if len(items) > MAX_STACK_ENTRIES:
        raise ValueError(
            f"the LORA_STACK has {len(items)} entries; at most {MAX_STACK_ENTRIES} are applied at once "
            "(each keeps its file in memory): merge some of them into one LoRA first, or split the graph"
        )
    entries = []
    for i, item in enumerate(items):
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
        block_weights = getattr(item, "block_weights", "")
        entries.append(StackEntry(name, _strength(sm, f"LORA_STACK entry {i}"), _strength(sc, f"LORA_STACK entry {i}"),
                                  block_weights if isinstance(block_weights, str) else ""))  # fmt: skip
    return entries


def _strength(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(
            f"{where}: strengths must be finite numbers, got {value!r:.40}; use e.g. 1.0, 0.5 or -1"
        )
    return number


# The LoRA Stack node's JSON input, written by the frontend's row widget (web/js: same name).
ROWS = "rows_json"
ROW_FIELDS = ("lora", "on", "strength_model", "strength_clip", "block_weights")


def _load_rows(text: str) -> list:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_ROWS_BYTES:
        raise ValueError(
            f"{ROWS} is {size} bytes; at most {MAX_ROWS_BYTES // 1024} KiB ({MAX_ROWS} rows) are read: remove "
            "rows, or chain a second LoRA Stack"
        )
    try:
        rows = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, huge integers, deep nesting
        raise ValueError(
            f"{ROWS} is not valid JSON ({type(e).__name__}: {str(e)[:120]}); expected a list of rows like "
            '{"lora": "a.safetensors"}'
        ) from None
    if not isinstance(rows, list):
        raise ValueError(f"{ROWS} must be a JSON list of rows, got {type(rows).__name__}")
    if len(rows) > MAX_ROWS:
        raise ValueError(
            f"{ROWS} has {len(rows)} rows; at most {MAX_ROWS} are read (each keeps its LoRA file in memory "
            "until the patch is built): remove rows, or chain a second LoRA Stack"
        )
    return rows


def _check_row(i: int, row) -> None:
    if not isinstance(row, dict) or not isinstance(row.get("lora"), str):
        raise ValueError(f"{ROWS} row {i} is {str(row)[:80]}; each row needs at least a 'lora' file name")
    unknown = set(row) - set(ROW_FIELDS)
    if unknown:
        raise ValueError(
            f"{ROWS} row {i} has unknown fields {sorted(unknown)[:5]}; known: {', '.join(ROW_FIELDS)}"
        )
    if (
        not isinstance(row.get("block_weights", ""), str)
        or len(row.get("block_weights", "")) > MAX_SPEC_CHARS
    ):
        raise ValueError(
            f"{ROWS} row {i}: block_weights must be a text of at most {MAX_SPEC_CHARS} characters, like 'in=0.5'"
        )


def read_rows(text: str) -> list[StackEntry]:
    """Enabled entries from the row widget's JSON: [{"lora": ..., "on": ..., ...}, ...], at most
    MAX_ROWS rows and MAX_ROWS_BYTES bytes."""
    if not text or not text.strip():
        return []
    entries = []
    for i, row in enumerate(_load_rows(text)):
        _check_row(i, row)
        if row["lora"] in ("", "None") or not row.get("on", True):
            continue
        where = f"{ROWS} row {i}"
        sm = _strength(row.get("strength_model", 1.0), where)
        sc = _strength(row.get("strength_clip", 1.0), where)
        entries.append(StackEntry(row["lora"], sm, sc, row.get("block_weights", "")))
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
