"""What every adapter kind module provides (the Kind record) and the float32 helpers they share.

The numbers follow ComfyUI core's ``calculate_weight`` (0.3.75) for strength_model = 1, no offset
and no extra function: a file applied here and there gives the same weights (fp32, 1e-5).
Everything is computed in float32 and cast back to the target weight's dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

Shape = tuple[int, ...]
# role -> key of one module's tensors in the file, as parsing grouped them
Keys = Mapping[str, str]
FIX = "download the file again (it may be damaged) or pick another LoRA"


class BadLayout(ValueError):
    """A module's keys hold values no layout can mean; the message names the key and the fix."""


@dataclass(frozen=True)
class Built:
    """A module's record as built from a file, the keys it used and the label the report shows."""

    adapter: object
    used: list[str]
    label: str


@dataclass(frozen=True)
class Bypass:
    """What bypass mode (apply/bypass.py: the change computed on a layer's activations) does with a kind.

    ``label``: the kind as bypass messages name it. ``weight_dependent``: the change reads the base
    weight itself (a rotation, a product with W, a replacement), so it never runs on activations;
    otherwise it runs as its dense delta (LoRA runs: as their fused factors). ``changes_bias``: it
    can patch a bias too. ``channel_factor(adapter, strength, like)``: the kind scales channels
    instead of adding a change ((IA)3; it runs alone on a layer): the factor per channel, in
    ``like``'s device and dtype, on the inputs when ``on_input(adapter)``, else on the outputs.
    """

    label: str
    weight_dependent: bool = False
    changes_bias: bool = False
    channel_factor: Callable[[object, float, Tensor], Tensor] | None = None
    on_input: Callable[[object], bool] = lambda adapter: False


@dataclass(frozen=True)
class Extreme:
    """What the overflow check (apply/extremes.py) asks of a kind whose change it judges.

    ``bound(adapter)``: an upper bound on the largest change of one entry at strength 1, from the
    factors alone (None: no cheap one for this layout). ``peak(adapter, shape)``: the exact largest
    change (None: taken from the kind's delta). ``shape_free(adapter)``: the peak needs no weight
    shape. ``scaled`` False: strength does not scale the change (set_weight replaces the weight).
    """

    bound: Callable[[object], float | None]
    peak: Callable[[object, Shape | None], float] | None = None
    shape_free: Callable[[object], bool] = lambda adapter: False
    scaled: bool = True


@dataclass(frozen=True)
class Kind:
    """One adapter kind: its record, the key suffixes it owns and what the library does with it.

    ``apply(adapter, weight, strength)`` returns the new weight in ``weight``'s dtype; ``delta``
    (plain-sum kinds only) the dense float32 change at strength 1; ``fit_error`` why the record
    cannot patch a weight of a shape (shapes only, runs on 'meta'), or None.
    """

    name: str  # what messages that list kinds call it
    record: type
    family: str  # the file-key family its suffixes belong to (OFT and BOFT share "oft")
    suffixes: Mapping[str, str]  # key suffix -> role
    build: Callable[[Keys, Mapping[str, Tensor]], Built | None]
    apply: Callable[[object, Tensor, float], Tensor]
    fit_error: Callable[[object, Shape], str | None]
    # ComfyUI's override order when one module has keys of several kinds: lower is tried first.
    precedence: int
    bypass: Bypass  # how it runs on activations, or that it cannot (every kind says which)
    extreme: Extreme | None  # how the overflow check judges it; None: its change depends on the weight
    delta: Callable[[object, Shape, torch.device], Tensor] | None = None  # None: never a plain sum
    rank: Callable[[object], int | None] = lambda adapter: None
    scale: Callable[[object], float] = lambda adapter: 1.0
    takes_extras: bool = True  # reads the module's alpha and dora_scale
    matrix_factors: bool = True  # its factors are matrices (or kernels): a 0-D / 1-D one is damage
    flag_roles: frozenset[str] = field(default_factory=frozenset)  # numbers or flags, not factors


def alpha_over_rank(alpha: float | None, rank: int | None) -> float:
    """ComfyUI's alpha / rank factor: 1.0 where the file has no alpha or no rank applies."""
    return 1.0 if alpha is None or rank is None else alpha / rank


def f32(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device=device, dtype=torch.float32)


def reshape_to(diff: Tensor, shape: Shape, kind: str) -> Tensor:
    if diff.numel() != math.prod(shape):
        raise ValueError(
            f"{kind} gives {tuple(diff.shape)} ({diff.numel()} values) but the target weight is {tuple(shape)}: "
            "the LoRA was made for a different model"
        )
    return diff.reshape(shape)


def in_float32(weight: Tensor, change: Callable[[Tensor], Tensor]) -> Tensor:
    """``change`` run on a float32 copy of ``weight``, the result cast back to its dtype."""
    return change(weight.to(dtype=torch.float32, copy=True)).to(weight.dtype)


def without_extras(adapter):
    """The record with its DoRA magnitude (and a LoRA's reshape) dropped: the plain sum it adds."""
    if getattr(adapter, "dora_scale", None) is None and getattr(adapter, "reshape", None) is None:
        return adapter
    return replace(adapter, dora_scale=None, **({"reshape": None} if hasattr(adapter, "reshape") else {}))


def dry_run_error(delta: Callable, adapter, shape: Shape) -> str | None:
    """The error computing the plain change on 'meta' raises, as a message, or None."""
    try:
        delta(without_extras(adapter), shape, torch.device("meta"))
    except (ValueError, RuntimeError) as e:
        return str(e)
    return None
