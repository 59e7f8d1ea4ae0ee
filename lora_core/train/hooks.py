"""Forward pre-hooks Train LoRA puts on a base model for a run, each returned with its undo function,
and the check that gradients pass through the base layers whatever form their weights are stored in."""

from __future__ import annotations

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


def _cast(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """weight.to(dtype), exactly. PyTorch casts float8 on the CPU one value at a time; both fp8
    forms map onto float16 by their bits (e5m2 is float16's top byte; e4m3fn's sign, exponent and
    mantissa shifted into float16 are its value / 256), which converts at vector speed (through
    float32, faster than float16 -> bfloat16 directly): 5-6x faster on a cache-sized piece. A piece
    holding e4m3fn's NaN (the only code with all 7 low bits set) takes PyTorch's cast."""
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
    if weight.dtype != torch.float8_e4m3fn:
        return weight.to(dtype)
    bits = weight.view(torch.uint8).to(torch.int16)
    magnitude = bits & 0x7F
    if int(magnitude.max()) == 0x7F:
        return weight.to(dtype)
    sign = bits.bitwise_and_(0x80).bitwise_left_shift_(8)
    half = magnitude.bitwise_left_shift_(7).bitwise_or_(sign).view(torch.float16)
    return half.float().mul_(256.0).to(dtype)


def _piece_rows(weight: Tensor) -> int:
    return max(1, PIECE_ELEMENTS // max(1, weight[0].numel()))


def cast_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y = x Wᵀ + b with W (and b) cast to x's dtype a piece of output rows at a time."""
    rows = _piece_rows(weight)
    bias = None if bias is None else bias.to(x.dtype)
    if rows >= weight.shape[0]:
        return F.linear(x, _cast(weight, x.dtype), bias)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for start in range(0, weight.shape[0], rows):
        end = start + rows
        out[..., start:end] = F.linear(
            x, _cast(weight[start:end], x.dtype), None if bias is None else bias[start:end]
        )
    return out


def cast_linear_input_grad(grad: Tensor, weight: Tensor) -> Tensor:
    """The input's gradient of cast_linear, dy W, with W cast a piece at a time: pieces of rows
    summed, or for a weight wider than tall (whose row pieces would be few rows, short products)
    pieces of columns, each giving its columns of the result."""
    rows = _piece_rows(weight)
    if rows >= weight.shape[0]:
        return grad @ _cast(weight, grad.dtype)
    if weight.shape[1] > weight.shape[0]:
        cols = max(1, PIECE_ELEMENTS // weight.shape[0])
        out = grad.new_empty(*grad.shape[:-1], weight.shape[1])
        for start in range(0, weight.shape[1], cols):
            out[..., start : start + cols] = grad @ _cast(weight[:, start : start + cols], grad.dtype)
        return out
    total = None
    for start in range(0, weight.shape[0], rows):
        part = grad[..., start : start + rows] @ _cast(weight[start : start + rows], grad.dtype)
        total = part if total is None else total.add_(part)
    return total


class _RecastLinear(torch.autograd.Function):
    """y = x Wᵀ + b for a frozen W stored in another dtype than the computation (bf16, fp8): W is
    cast for the product (in pieces: cast_linear), and backward casts it again rather than keeping
    the cast copy alive until then. Only the input gets a gradient (the base is frozen). Under
    autocast the product runs in autocast's dtype, as autocast runs a Linear, and the input's
    gradient comes back in the input's own dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)  # the stored tensor itself: no copy
        ctx.x_dtype = x.dtype
        return cast_linear(x.to(dtype), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return cast_linear_input_grad(grad, weight).to(ctx.x_dtype), None, None, None


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
        own = module.forward

        def forward(x, *args, _module=module, _own=own, **kwargs):
            if args or kwargs or not _recastable(_module, x):
                return _own(x, *args, **kwargs)
            dtype = _compute_dtype(x)
            if not torch.is_grad_enabled():  # e.g. a checkpointed block's first forward
                return cast_linear(x.to(dtype), _module.weight, _module.bias)
            return _RecastLinear.apply(x, _module.weight, _module.bias, dtype)

        module.forward = forward
        replaced.append(module)

    def undo() -> None:
        for module in replaced:
            module.__dict__.pop("forward", None)

    return undo
