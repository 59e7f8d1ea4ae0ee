"""Whether an adapter fits the weight it patches, from shapes alone (on 'meta': nothing is computed).

Every module of a plan passes here before any patch runs, so a change computed later has the size
of the model's own weight (or the slice of it a fused weight gives the module).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import torch

from .adapters import (
    Adapter,
    BoftAdapter,
    GloraAdapter,
    Ia3Adapter,
    LoraAdapter,
    OftAdapter,
    OftV2Adapter,
    SetAdapter,
    _dora,
    apply,
    boft_fit_error,
    delta,
    ia3_fit_error,
    oftv2_fit_error,
    peft_dora_fit_error,
)

# Flux control LoRAs widen img_in 2x (Canny, Depth); an inpainting one would 6x. A file asking for
# more only makes the patch allocate that much.
MAX_GROWTH = 16


def target_shape(target: object, shapes: Mapping[str, tuple[int, ...]] | None) -> tuple[int, ...] | None:
    """The shape a key-map target patches: the weight's, or for ``(key, (dim, start, length), ...)``
    the slice's (a fused qkv weight); None when unknown."""
    key = target if isinstance(target, str) else target[0]
    if shapes is None or key not in shapes:
        return None
    shape = tuple(shapes[key])
    if isinstance(target, str):
        return shape
    offset = target[1] if len(target) > 1 else None
    if offset is None:
        return shape
    dim, start, length = offset
    if not (0 <= dim < len(shape) and start >= 0 and start + length <= shape[dim]):
        return None  # not a slice of this weight: ComfyUI's own narrow() will say so
    return (*shape[:dim], length, *shape[dim + 1 :])


def shape_error(adapter: Adapter, shape: tuple[int, ...]) -> str | None:
    """Why ``adapter`` cannot patch a weight of ``shape``, or None. Shapes only: runs on 'meta'."""
    if isinstance(adapter, SetAdapter):
        ok = tuple(adapter.weight.shape) == shape
        return None if ok else f"set_weight {tuple(adapter.weight.shape)} vs weight {shape}"
    if isinstance(adapter, GloraAdapter):
        try:
            meta = GloraAdapter(
                *(t.to("meta") for t in (adapter.a1, adapter.a2, adapter.b1, adapter.b2)), adapter.alpha
            )
            apply(meta, torch.empty(shape, device="meta"))
        except (ValueError, RuntimeError) as e:
            return f"GLoRA: {e}"
        return dora_error(adapter, shape)
    if isinstance(adapter, OftAdapter):
        num, size, size2 = adapter.blocks.shape
        ok = size == size2 and num * size == shape[0]
        if not ok:
            return f"OFT blocks {tuple(adapter.blocks.shape)} do not cover the weight's {shape[0]} rows"
        return dora_error(adapter, shape)
    if isinstance(adapter, Ia3Adapter):
        return ia3_fit_error(adapter, shape)
    if isinstance(adapter, OftV2Adapter):
        return oftv2_fit_error(adapter, shape)
    if isinstance(adapter, BoftAdapter):
        error = boft_fit_error(tuple(adapter.blocks.shape), shape[0])
        rescale = adapter.rescale
        if error is None and rescale is not None:
            try:
                fits = torch.broadcast_shapes(tuple(rescale.shape), shape) == torch.Size(shape)
            except RuntimeError:
                fits = False
            if not fits:
                error = f"BOFT rescale {tuple(rescale.shape)} does not fit the weight {shape}"
        return error or dora_error(adapter, shape)
    if isinstance(adapter, LoraAdapter) and adapter.reshape is not None:
        grown = tuple(adapter.reshape)
        if len(grown) != len(shape) or any(n < o for n, o in zip(grown, shape, strict=True)):
            return f"reshape_weight {grown} cannot hold the weight {shape}: it may only grow it"
        if math.prod(grown) > MAX_GROWTH * math.prod(shape):
            return (
                f"reshape_weight {grown} would make the weight {shape} more than {MAX_GROWTH} times "
                "larger; a control LoRA widens it a few times at most"
            )
        shape = grown
    if isinstance(adapter, LoraAdapter):
        if adapter.up.shape[0] != shape[0]:
            return f"LoRA up {tuple(adapter.up.shape)} has {adapter.up.shape[0]} outputs, the weight {shape} has {shape[0]}"
        error = peft_dora_fit_error(adapter, shape)
        if error:
            return error
        if adapter.mid is None and adapter.dora_scale is None:  # the common case, without a dry run
            inputs = math.prod(adapter.down.shape[1:])
            if inputs != math.prod(shape[1:]):
                return f"LoRA down {tuple(adapter.down.shape)} takes {inputs} inputs, the weight {shape} has {math.prod(shape[1:])}"
            return None
    plain = adapter
    if getattr(adapter, "dora_scale", None) is not None or getattr(adapter, "reshape", None) is not None:
        plain = replace(
            adapter, dora_scale=None, **({"reshape": None} if isinstance(adapter, LoraAdapter) else {})
        )
    try:
        delta(plain, shape, "meta")
    except (ValueError, RuntimeError) as e:
        return str(e)
    return dora_error(adapter, shape)


def dora_error(adapter: Adapter, shape: tuple[int, ...]) -> str | None:
    """Why the adapter's ``dora_scale`` cannot scale a weight of ``shape`` (ComfyUI's DoRA math
    needs one magnitude per output row or per input column, shaped to broadcast), or None."""
    scale = getattr(adapter, "dora_scale", None)
    if scale is None:
        return None
    weight = torch.empty(shape, device="meta")
    try:
        out = _dora(weight, weight, scale.to("meta"), 1.0, peft=getattr(adapter, "dora_peft", False))
    except (ValueError, RuntimeError, IndexError):
        out = None
    if out is None or tuple(out.shape) != tuple(shape):
        return (
            f"dora_scale {tuple(scale.shape)} does not fit the weight {shape}: it holds one magnitude per "
            "output row (shaped (rows, 1, ...)) or per input column (shaped (1, columns, ...))"
        )
    return None
