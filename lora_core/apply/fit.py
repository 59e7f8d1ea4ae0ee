"""The shape a key-map target patches, for the fit check (on 'meta': nothing is computed).

Every module of a plan passes ``shape_error`` (each adapter kind's own check, in lora_core.adapters)
before any patch runs, so a change computed later has the size of the model's own weight (or the
slice of it a fused weight gives the module).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..adapters import dora_error, shape_error
from ..adapters.lora import MAX_GROWTH

__all__ = ["MAX_GROWTH", "dora_error", "shape_error", "target_shape"]


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
