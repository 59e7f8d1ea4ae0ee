"""Bypass mode: a layer's LoRA terms computed on its activations, y = f(x) + s * B(A x), never on its weight.

A patched weight is a new tensor the size of the base weight (for a quantized base: a dequantized
copy, rounded back). On activations the base weight is never read: each term adds its change to
the layer's output, so the base can stay quantized or offloaded. The forms, all exact where the
patched weight is (fp32), for a layer y = W x + b (Linear, or an N-d convolution with W's geometry):

- LoRA / LoCon runs (stack entries fused as in ``patching.prepare``): ``up(down(x))``, down with the
  layer's kernel, stride, padding and dilation, up as a 1x1 map; a Tucker mid is folded into down.
- LoHa, LoKr, full diffs: their dense change D, built per call and dropped (``F.linear(x, D)`` or
  the layer's convolution with D): no copy of it outlives the call.
- A bias diff: added to the output channels.
- (IA)3 alone on a layer: x scaled per input channel before the layer, or (y - b) per output channel.
- ComfyUI's slice of a fused weight (offset on dim 0): the change lands on those output channels;
  a target function (Flux's norm_out swap) is applied to the change's output channels, as it is to
  the weight's rows when patching.

What reads the weight itself cannot be done here (DoRA normalises W + delta, OFT / BOFT rotate W,
GLoRA multiplies by W, set_weight replaces it, reshape_weight grows it): ``refusal`` names it.
Everything here is torch only; the bridge finds the layers and hooks them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters import delta, kind_of
from .patching import FusedLora, Step, Term, prepare

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_COMPUTE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # else: float32


@dataclass(frozen=True)
class Layer:
    """The geometry of the layer a parameter belongs to: a Linear (``conv_dims`` 0) or a convolution."""

    weight_shape: tuple[int, ...]
    conv_dims: int = 0
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def channel_dim(self) -> int:
        """The output's channel axis: last for a Linear, 1 for a convolution (N, C, ...)."""
        return 1 if self.conv_dims else -1


@dataclass(frozen=True)
class Target:
    """One patched parameter: which (``weight`` or ``bias``), the output rows a slice covers (ComfyUI's
    offset on dim 0, None: all) and the target's function (None: identity)."""

    param: str
    rows: tuple[int, int] | None = None  # (start, size)
    function: Callable | None = None


def kind_name(adapter) -> str:
    """The adapter kind as users know it, for messages: DoRA and reshape_weight (variants of several
    kinds) first, then the kind's own ``bypass.label``."""
    if getattr(adapter, "dora_scale", None) is not None:
        return "DoRA"
    if getattr(adapter, "reshape", None) is not None:
        return "reshape_weight"
    return kind_of(adapter).bypass.label


def _weight_dependent(adapter) -> bool:
    """Whether the change reads the base weight itself: never on activations."""
    variant = (
        getattr(adapter, "dora_scale", None) is not None or getattr(adapter, "reshape", None) is not None
    )
    return variant or kind_of(adapter).bypass.weight_dependent


def _scales_channels(adapter) -> bool:
    return kind_of(adapter).bypass.channel_factor is not None


def refusal(terms: Sequence[Term], layer: Layer | None, target: Target) -> str | None:
    """Why these terms cannot run on the layer's activations (a short reason naming the kind), or None."""
    weight_dependent = sorted({kind_name(t.adapter) for t in terms if _weight_dependent(t.adapter)})
    if weight_dependent:
        return f"{', '.join(weight_dependent)} depends on the base weight"
    if layer is None:
        return "the parameter is not a Linear or convolution weight"
    if target.param == "bias":
        biases = all(kind_of(t.adapter).bypass.changes_bias for t in terms)
        return None if biases else "only a full diff can change a bias"
    scaling = [t.adapter for t in terms if _scales_channels(t.adapter)]
    if scaling:
        name = kind_name(scaling[0])
        if len(terms) > 1:
            return f"{name} together with other adapters on one layer"
        if target.rows is not None or target.function is not None:
            return f"{name} on a slice of a fused weight"
        return kind_of(scaling[0]).fit_error(scaling[0], tuple(layer.weight_shape))
    return None


def _lora_conv_shape(layer: Layer, factor: Tensor) -> tuple[int, ...] | None:
    """``down`` (R, in*k*k) as the layer's kernel (R, in, *k), None when its size does not fit."""
    tail = layer.weight_shape[1:]
    per_rank = 1
    for n in tail:
        per_rank *= n
    return (factor.shape[0], *tail) if factor.shape[1] == per_rank else None


class BypassPatch:
    """Every term on one parameter of one layer, applied to activations; built once, called every forward.

    The factors are cast once per (device, dtype) the layer runs in and kept (LoRA-sized); dense
    LoHa / LoKr changes are rebuilt at each call instead, so nothing weight-sized is kept.
    """

    def __init__(self, terms: Sequence[Term], layer: Layer, target: Target):
        problem = refusal(terms, layer, target)
        if problem:
            raise ValueError(problem)
        self.layer, self.target = layer, target
        self.steps: tuple[Step, ...] = prepare(terms)
        # a kind that scales channels ((IA)3) runs alone on its layer (``refusal``)
        self._scaling = terms[0] if terms and _scales_channels(terms[0].adapter) else None
        self._cast: dict[tuple, tuple[Tensor, Tensor]] = {}

    @property
    def empty(self) -> bool:
        return not self.steps

    @property
    def scales_input(self) -> bool:
        """True for (IA)3 on inputs: the layer's input is scaled before it runs (``scale_input``)."""
        return self._scaling is not None and kind_of(self._scaling.adapter).bypass.on_input(
            self._scaling.adapter
        )

    def _channel_factor(self, like: Tensor) -> Tensor:
        term = self._scaling
        return kind_of(term.adapter).bypass.channel_factor(term.adapter, term.strength, like)

    def _channels(self, v: Tensor, ndim: int) -> Tensor:
        """A per-channel vector shaped to broadcast along the output's channel axis."""
        if not self.layer.conv_dims:
            return v
        return v.reshape(-1, *([1] * (ndim - 2)))

    def scale_input(self, x: Tensor) -> Tensor:
        return x * self._channels(self._channel_factor(x), x.dim())

    def output(self, x: Tensor, y: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's output ``y`` (for input ``x``) with this parameter's change added."""
        if self._scaling is not None:
            if self.scales_input:
                return y
            scale = self._channels(self._channel_factor(y), y.dim())
            if bias is None:
                return y * scale
            b = self._channels(bias.to(device=y.device, dtype=y.dtype), y.dim())
            return (y - b) * scale + b
        change = self.change(x, y.dim())
        if change is None:
            return y
        change = change.to(y.dtype)
        if self.target.function is not None:
            ch = self.layer.channel_dim % y.dim()
            change = self.target.function(change.movedim(ch, 0)).movedim(0, ch)
        if self.target.rows is None:
            return y + change
        start, size = self.target.rows
        out = y.clone() if y.requires_grad else y  # in place, but never on a tensor autograd tracks
        out.narrow(self.layer.channel_dim % y.dim(), start, size).add_(change)
        return out

    def change(self, x: Tensor, ndim: int) -> Tensor | None:
        """The sum of every step's change for input ``x`` (in x's dtype, float32 for non-float x)."""
        x = x if x.dtype in _COMPUTE else x.to(torch.float32)
        total = None
        for step in self.steps:
            part = self._step_change(step, x)
            total = part if total is None else total + part
        return total

    def _rows_shape(self) -> tuple[int, ...]:
        shape = self.layer.weight_shape
        if self.target.param == "bias":
            shape = shape[:1]
        if self.target.rows is None:
            return tuple(shape)
        return (self.target.rows[1], *shape[1:])

    def _step_change(self, step: Step, x: Tensor) -> Tensor:
        if self.target.param == "bias":
            # a bias change (full diffs only, see ``refusal``): its delta, shaped like the bias rows
            diff = delta(step.adapter, self._rows_shape(), x.device).to(x.dtype) * step.strength
            return self._channels(diff.reshape(-1), x.dim() if self.layer.conv_dims else 1)
        if isinstance(step, FusedLora) and (not self.layer.conv_dims or self.layer.groups == 1):
            return self._lora(step, x)
        if isinstance(step, FusedLora):  # grouped convolution: the low-rank product does not split
            up, down = self._factors(step, x)
            dense = (up @ down).reshape(self._rows_shape())
        else:
            dense = delta(step.adapter, self._rows_shape(), x.device).to(x.dtype) * step.strength
        return self._apply_dense(dense, x)

    def _factors(self, step: FusedLora, x: Tensor) -> tuple[Tensor, Tensor]:
        """(up with its coefficients folded in, down) in x's device and dtype, cast once and kept."""
        key = (id(step), x.device, x.dtype)
        found = self._cast.get(key)
        if found is None:
            up, down, alpha = step.scaled(x.device)
            found = ((up * alpha).to(x.dtype), down.to(x.dtype))
            self._cast[key] = found
        return found

    def _lora(self, step: FusedLora, x: Tensor) -> Tensor:
        up, down = self._factors(step, x)  # (out, R), (R, in*k*k)
        layer = self.layer
        if not layer.conv_dims:
            return F.linear(F.linear(x, down), up)
        conv = _CONVS[layer.conv_dims]
        kernel = _lora_conv_shape(layer, down)
        if kernel is None:
            raise ValueError(
                f"LoRA down {tuple(down.shape)} does not fit the layer's kernel {layer.weight_shape}"
            )
        inner = conv(x, down.reshape(kernel), None, layer.stride, layer.padding, layer.dilation)
        return conv(inner, up.reshape(*up.shape, *([1] * layer.conv_dims)))

    def _apply_dense(self, dense: Tensor, x: Tensor) -> Tensor:
        layer = self.layer
        if not layer.conv_dims:
            return F.linear(x, dense.reshape(dense.shape[0], -1))
        return _CONVS[layer.conv_dims](
            x, dense, None, layer.stride, layer.padding, layer.dilation, layer.groups
        )
