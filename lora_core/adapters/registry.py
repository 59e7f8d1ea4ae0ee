"""The one list of adapter kinds, and everything the library asks of an adapter, by looking it up there.

Parsing, fit (shape) errors, apply / delta, plain-sum checks, merge refusals and every message
that names kinds loop over KINDS: adding a kind is one module with a KIND and one line below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import boft, diff, glora, ia3, loha, lokr, lora, oft, oft_peft, set_weight
from .base import Kind, Shape

# In the order messages list them. Parsing tries them by ``precedence`` (ComfyUI's override order).
KINDS: tuple[Kind, ...] = (
    lora.KIND,
    loha.KIND,
    lokr.KIND,
    oft.KIND,
    boft.KIND,
    oft_peft.KIND,
    glora.KIND,
    ia3.KIND,
    diff.KIND,
    set_weight.KIND,
)
PARSE_ORDER: tuple[Kind, ...] = tuple(sorted(KINDS, key=lambda k: k.precedence))
_BY_RECORD = {kind.record: kind for kind in KINDS}


def kind_of(adapter) -> Kind:
    kind = _BY_RECORD.get(type(adapter))
    if kind is None:
        raise TypeError(f"not an adapter record: {type(adapter).__name__}")
    return kind


def suffix_roles() -> dict[str, tuple[str, str]]:
    """Every suffix the kinds own -> (family, role); kinds that share a suffix must agree on it."""
    table: dict[str, tuple[str, str]] = {}
    for kind in KINDS:
        for suffix, role in kind.suffixes.items():
            entry = (kind.family, role)
            if table.setdefault(suffix, entry) != entry:
                raise RuntimeError(f"suffix {suffix} claimed as {table[suffix]} and {entry}")
    return table


def names(kinds=KINDS) -> list[str]:
    """The kinds' names in registry order, each once (LyCORIS and PEFT OFT share one)."""
    return list(dict.fromkeys(kind.name for kind in kinds))


def either(words: list[str]) -> str:
    """'a, b or c', for messages that list kinds."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def not_a_plain_sum() -> list[str]:
    """What cannot be summed or merged into a LoRA file: DoRA (a variant of several kinds) and
    every kind without a plain delta."""
    return ["DoRA"] + names([kind for kind in KINDS if kind.delta is None])


def dense_sums() -> list[str]:
    """Kinds that are a plain sum but not a low-rank pair: merged as dense deltas."""
    return names([kind for kind in KINDS if kind.delta is not None and kind is not lora.KIND])


def is_linear(adapter) -> bool:
    """True when ``apply`` is ``weight + strength * delta``: such adapters can be summed in one pass."""
    if kind_of(adapter).delta is None:
        return False
    return getattr(adapter, "dora_scale", None) is None and getattr(adapter, "reshape", None) is None


def delta(adapter, shape: Shape, device: torch.device | str = "cpu") -> Tensor:
    """Dense float32 change at strength 1, shaped like the target weight (linear adapters only)."""
    kind = kind_of(adapter)
    if not is_linear(adapter):
        raise ValueError(
            f"{type(adapter).__name__} with DoRA, set_weight or a reshape is not a plain sum; use apply() for it"
        )
    return kind.delta(adapter, tuple(shape), torch.device(device))


def apply(adapter, weight: Tensor, strength: float = 1.0) -> Tensor:
    """New weight = weight patched by ``adapter`` at ``strength``; ``weight`` is left untouched."""
    return kind_of(adapter).apply(adapter, weight, strength)


def shape_error(adapter, shape: tuple[int, ...]) -> str | None:
    """Why ``adapter`` cannot patch a weight of ``shape``, or None. Shapes only: runs on 'meta'."""
    return kind_of(adapter).fit_error(adapter, tuple(shape))


def scale_of(adapter) -> float:
    """The alpha/rank factor ComfyUI applies (1.0 when alpha is absent or does not apply)."""
    return kind_of(adapter).scale(adapter)


def rank_of(adapter) -> int | None:
    """The adapter's rank where the notion applies (LoRA, LoHa, factorised LoKr)."""
    return kind_of(adapter).rank(adapter)
