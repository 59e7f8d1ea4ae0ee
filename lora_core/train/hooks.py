"""Forward pre-hooks Train LoRA puts on a base model for a run, each returned with its undo function."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def clone_inputs(modules: Iterable[nn.Module]) -> Callable[[], None]:
    """Hands each module a copy of its floating-point tensor inputs; returns the undo function.

    ComfyUI's DiT blocks add residuals in place (``x += gate * f(norm(x))``): once LoRA makes x
    require grad, that overwrites the tensor the norm saved for backward, and a checkpointed block
    would overwrite the input it is recomputed from. Given the block and its norms, each works on
    its own copy instead; the values, and so the results, are unchanged.
    """

    def pre_hook(_module, args, kwargs):
        return tuple(_copy(a) for a in args), {k: _copy(v) for k, v in kwargs.items()}

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in modules]

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return undo
