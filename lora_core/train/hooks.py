"""Forward pre-hooks Train LoRA puts on a base model for a run, each returned with its undo function,
and the check that gradients pass through the base layers whatever form their weights are stored in."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def weight_form(module: nn.Module) -> str:
    """How a layer stores its weight, in words a user can act on: a tensor subclass with its layout
    (ComfyUI 0.12's QuantizedTensor TensorCoreFP8E4M3Layout, GGUF's GGMLTensor with its quantization
    type), or the dtype of a plain tensor (float8_e4m3fn, int8 ...)."""
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    dtype = str(getattr(weight, "dtype", "")).replace("torch.", "")
    if kind in ("Tensor", "Parameter"):
        return f"{dtype} tensor"
    layout = getattr(module, "layout_type", None) or getattr(weight, "_layout_type", None)
    layout = layout or getattr(weight, "tensor_type", None)
    return kind + (f" {getattr(layout, 'name', layout)}" if layout is not None else "")


def _probe_input(module: nn.Module, weight) -> Tensor:
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    device = weight.device
    if isinstance(module, nn.Conv2d):
        k = tuple(module.kernel_size)
        return torch.zeros(1, module.in_channels, *k, dtype=dtype, device=device)
    return torch.zeros(1, int(module.in_features), dtype=dtype, device=device)


def check_trains_through(targets: Iterable, name_of: Callable = lambda t: t.name) -> None:
    """Raises ValueError naming the layer and its weight form when a LoRA on a layer's output could
    not get gradients through the layers before it: one probe per weight form (a zero input that
    requires grad, forward and backward through the layer as the model computes it)."""
    seen: set[tuple] = set()
    for target in targets:
        module = target.module
        form = weight_form(module)
        if (type(module), form) in seen:
            continue
        seen.add((type(module), form))
        x = _probe_input(module, module.weight).requires_grad_(True)
        problem = None
        try:
            with torch.enable_grad():
                y = module(x)
                if not (isinstance(y, Tensor) and y.requires_grad):
                    problem = "its output carries no gradient"
                else:
                    (grad,) = torch.autograd.grad(y.float().sum(), x)
                    if grad.shape != x.shape:
                        problem = (
                            f"the gradient has shape {tuple(grad.shape)}, not the input's {tuple(x.shape)}"
                        )
        except (RuntimeError, NotImplementedError, TypeError) as e:
            problem = f"{type(e).__name__}: {str(e)[:200]}"
        if problem is not None:
            raise ValueError(
                f"layer {name_of(target)} ({type(module).__name__}) keeps its weight as {form}, which "
                "training cannot backpropagate through "
                f"({problem}). Load the base unquantized or as fp8 (UNETLoader weight_dtype default "
                "or fp8_e4m3fn, a bf16 / fp16 / fp8 checkpoint)"
            )


# A frozen weight stored in another dtype than the computation is cast in pieces of at most this
# many elements (16 MB of float32), each used for its share of the product at once: the float32
# copy of a whole large layer (a Flux single block's linear1 is 66M weights, 264 MB) never exists,
# and each piece is still in the CPU's cache when the product reads it.
PIECE_ELEMENTS = 1 << 22


def _e4m3fn_finite(weight: Tensor) -> bool:
    """No NaN code (the only e4m3fn codes with all 7 low bits set) in an e4m3fn weight."""
    return weight.numel() == 0 or int((weight.view(torch.uint8) & 0x7F).max()) != 0x7F


def _e4m3fn_over_256(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """weight / 256 in ``dtype``, exactly, for an e4m3fn weight without NaN codes. Each code
    sign-extended to 16 bits and shifted up by 7 is the float16 with its sign, exponent and
    mantissa (float16's exponent bias is 8 above e4m3fn's, hence / 256), but for the sign's
    extended copy landing in bit 14, which is cleared; float16 then converts at vector speed
    (through float32, faster than float16 -> bfloat16 directly). Three integer passes: callers
    fold the 256 into the product rather than spend a fourth pass on the weight."""
    half = weight.view(torch.int8).to(torch.int16).bitwise_left_shift_(7).bitwise_and_(~0x4000)
    out = half.view(torch.float16).float()
    return out if dtype == torch.float32 else out.to(dtype)


def _cast(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """weight.to(dtype), exactly. PyTorch casts float8 on the CPU one value at a time; both fp8
    forms map onto float16 by their bits (e5m2 is float16's top byte; e4m3fn: _e4m3fn_over_256),
    which converts at vector speed. An e4m3fn piece holding a NaN code takes PyTorch's cast."""
    if weight.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return weight.to(dtype)
    if weight.dtype == torch.float8_e5m2:
        return (
            weight.view(torch.uint8)
            .to(torch.int16)
            .bitwise_left_shift_(8)
            .view(torch.float16)
            .float()
            .to(dtype)
        )
    if weight.dtype != torch.float8_e4m3fn or not _e4m3fn_finite(weight):
        return weight.to(dtype)
    return _e4m3fn_over_256(weight, torch.float32).mul_(256.0).to(dtype)


class FiniteCodes:
    """Whether a layer's weight is e4m3fn without NaN codes, read once per weight: a frozen
    weight does not change during a run, and one replaced or changed in place (a new tensor, a new
    version) is read again."""

    def __init__(self) -> None:
        self._seen: tuple | None = None

    def __call__(self, weight: Tensor) -> bool:
        if weight.dtype != torch.float8_e4m3fn or weight.device.type != "cpu":
            return False
        try:
            key = (weight.data_ptr(), weight._version)
        except RuntimeError:  # an inference tensor has no version counter
            key = (weight.data_ptr(), None)
        seen = self._seen
        if seen is None or seen[0]() is not weight or seen[1] != key:
            seen = self._seen = (weakref.ref(weight), key, _e4m3fn_finite(weight))
        return seen[2]


def _piece_cast(weight: Tensor, dtype: torch.dtype, finite_e4m3fn: bool) -> tuple[Callable, float]:
    """(cast, scale): cast(piece) is the piece in ``dtype`` divided by ``scale``, and the product
    is multiplied by ``scale`` once. A power of two gives the same bits, but for products within a
    factor 256 of float32's smallest normal (1e-38), which lose bits. An e4m3fn weight known to
    hold no NaN code casts in three passes, without _cast's read for NaN codes and its multiply
    (float32 or bfloat16 products; float16's range is too short to carry the input times 256)."""
    if finite_e4m3fn and weight.dtype == torch.float8_e4m3fn and dtype in (torch.float32, torch.bfloat16):
        return _e4m3fn_over_256, 256.0
    return _cast, 1.0


def _piece_rows(weight: Tensor) -> int:
    return max(1, PIECE_ELEMENTS // max(1, weight[0].numel()))


def cast_linear(x: Tensor, weight: Tensor, bias: Tensor | None, finite_e4m3fn: bool = False) -> Tensor:
    """y = x Wᵀ + b with W (and b) cast to x's dtype a piece of output rows at a time.
    ``finite_e4m3fn``: the caller knows W is e4m3fn without NaN codes (FiniteCodes)."""
    cast, scale = _piece_cast(weight, x.dtype, finite_e4m3fn)
    rows = _piece_rows(weight)
    if bias is not None:
        bias = bias.to(x.dtype)
        bias = bias if scale == 1.0 else bias / scale
    if rows >= weight.shape[0]:
        out = F.linear(x, cast(weight, x.dtype), bias)
    else:
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        for start in range(0, weight.shape[0], rows):
            end = start + rows
            out[..., start:end] = F.linear(
                x, cast(weight[start:end], x.dtype), None if bias is None else bias[start:end]
            )
    return out if scale == 1.0 else out.mul_(scale)


def cast_linear_input_grad(grad: Tensor, weight: Tensor, finite_e4m3fn: bool = False) -> Tensor:
    """The input's gradient of cast_linear, dy W, with W cast a piece at a time: pieces of rows
    summed, or for a weight wider than tall (whose row pieces would be few rows, short products)
    pieces of columns, each giving its columns of the result."""
    cast, scale = _piece_cast(weight, grad.dtype, finite_e4m3fn)
    rows = _piece_rows(weight)
    if rows >= weight.shape[0]:
        out = grad @ cast(weight, grad.dtype)
    elif weight.shape[1] > weight.shape[0]:
        cols = max(1, PIECE_ELEMENTS // weight.shape[0])
        out = grad.new_empty(*grad.shape[:-1], weight.shape[1])
        for start in range(0, weight.shape[1], cols):
            out[..., start : start + cols] = grad @ cast(weight[:, start : start + cols], grad.dtype)
    else:
        out = None
        for start in range(0, weight.shape[0], rows):
            part = grad[..., start : start + rows] @ cast(weight[start : start + rows], grad.dtype)
            out = part if out is None else out.add_(part)
    return out if scale == 1.0 else out.mul_(scale)


class _RecastLinear(torch.autograd.Function):
    """y = x Wᵀ + b for a frozen W stored in another dtype than the computation (bf16, fp8): W is
    cast for the product (in pieces: cast_linear), and backward casts it again rather than keeping
    the cast copy alive until then. Only the input gets a gradient (the base is frozen). Under
    autocast the product runs in autocast's dtype, as autocast runs a Linear, and the input's
    gradient comes back in the input's own dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, finite_e4m3fn):
        ctx.save_for_backward(weight)  # the stored tensor itself: no copy
        ctx.x_dtype = x.dtype
        ctx.finite_e4m3fn = finite_e4m3fn
        return cast_linear(x.to(dtype), weight, bias, finite_e4m3fn)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        out = cast_linear_input_grad(grad, weight, ctx.finite_e4m3fn)
        return out.to(ctx.x_dtype), None, None, None, None


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a Linear computes in on x: autocast's when it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _recastable(module: nn.Module, x) -> bool:
    weight, bias = module.weight, module.bias
    return (
        isinstance(x, Tensor)
        and x.is_floating_point()
        and type(weight) in (Tensor, nn.Parameter)
        and not weight.requires_grad
        and (weight.dtype != x.dtype or torch.is_autocast_enabled(x.device.type))
        and weight.device == x.device
        and (bias is None or (type(bias) in (Tensor, nn.Parameter) and not bias.requires_grad))
        and not getattr(module, "weight_function", None)
        and not getattr(module, "bias_function", None)
    )


def recast_frozen_linears(modules: Iterable[nn.Module]) -> Callable[[], None]:
    """During a run, the torch Linears among ``modules`` whose frozen weight is stored in another
    dtype than the computation (a bf16 or fp8 base computed in float32, as ComfyUI casts it per
    forward, or in autocast's dtype) compute through _RecastLinear; returns the undo function.

    Autograd would otherwise keep every cast weight of a checkpointed block (float32: 2x a bf16
    and 4x an fp8 weight) from its recompute until its backward, so the peak held a whole DiT
    block's weights in float32. Forward and backward cast the weight a piece at a time
    (cast_linear), so not even one whole layer's float32 copy exists. Under autocast (Train LoRA's
    bf16 / fp16 precision) autocast would also keep its own cast copy of every weight; here the
    pieces are cast straight to autocast's dtype. Calls that do not fit (weight patches, a weight
    on another device, a tensor subclass) run the layer's own forward.
    """
    replaced = []
    for module in modules:
        if not isinstance(module, nn.Linear) or "forward" in module.__dict__:
            continue
        own, finite_codes = module.forward, FiniteCodes()

        def forward(x, *args, _module=module, _own=own, _finite=finite_codes, **kwargs):
            if args or kwargs or not _recastable(_module, x):
                return _own(x, *args, **kwargs)
            dtype = _compute_dtype(x)
            weight = _module.weight
            finite = _finite(weight)
            if not torch.is_grad_enabled():  # e.g. a checkpointed block's first forward
                return cast_linear(x.to(dtype), weight, _module.bias, finite)
            return _RecastLinear.apply(x, weight, _module.bias, dtype, finite)

        module.forward = forward
        replaced.append(module)

    def undo() -> None:
        for module in replaced:
            module.__dict__.pop("forward", None)

    return undo
