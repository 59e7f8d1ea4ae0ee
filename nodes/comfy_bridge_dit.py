"""Train LoRA's bridge to ComfyUI's DiT and UNet blocks: which modules gradient checkpointing
wraps, which norms a DiT overwrites in place, a differentiable rotary embedding, and the Linears
whose frozen weights lora_core.train.hooks casts a piece at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Lists of transformer blocks a DiT's forward calls one by one (module calls, so a patched forward
# runs): Flux / Chroma, SD3 (MMDiT), Lumina2 / Z-Image (NextDiT, with its refiners), Qwen-Image,
# HiDream, Wan.
DIT_BLOCK_LISTS = ("double_blocks", "single_blocks", "joint_blocks", "noise_refiner", "context_refiner", "layers",
                   "transformer_blocks", "double_stream_blocks", "single_stream_blocks", "blocks")  # fmt: skip


def checkpoint_blocks(model) -> list:
    """The units of the MODEL that gradient checkpointing wraps: modules ComfyUI's forward calls as
    modules, so their replaced ``forward`` really runs.

    UNets: the layers of every input, middle and output block (ResBlocks, SpatialTransformers,
    Down/Upsample). ComfyUI's UNet never calls a block (TimestepEmbedSequential) as a module: it
    passes the block to ``forward_timestep_embed``, which calls each layer, so wrapping the block's
    forward recomputed nothing. DiTs: each transformer block of the lists ComfyUI's forward loops
    over (DIT_BLOCK_LISTS).
    """
    net = model.model.diffusion_model
    if all(hasattr(net, n) for n in ("input_blocks", "middle_block", "output_blocks")):
        return [
            layer for block in (*net.input_blocks, net.middle_block, *net.output_blocks) for layer in block
        ]
    found = []
    for name in DIT_BLOCK_LISTS:
        blocks = getattr(net, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            found.extend(blocks)
    return found


def dit_block_lists(model) -> dict[str, int]:
    """{block-list attribute: length} of a DiT (Flux: double_blocks 19, single_blocks 38); empty for UNets."""
    net = model.model.diffusion_model
    if hasattr(net, "input_blocks"):
        return {}
    return {
        n: len(getattr(net, n))
        for n in DIT_BLOCK_LISTS
        if isinstance(getattr(net, n, None), torch.nn.ModuleList)
    }


def inplace_residual_modules(model) -> list:
    """Modules whose saved inputs a DiT's blocks overwrite in place once gradients flow: the norms
    inside each transformer block (``x += f(norm(x))``: the norm keeps x for backward). None for
    UNets, whose layers train as they are. (A checkpointed block runs on copies of its inputs.)"""
    net = model.model.diffusion_model
    if hasattr(net, "input_blocks"):
        return []
    return [m for b in checkpoint_blocks(model) for m in b.modules() if type(m).__name__.endswith("Norm")]


def _rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # Interleaved RoPE: each pair (x[2k], x[2k+1]) times a 2x2 rotation, freqs_cis (..., d/2, 2, 2).
    pairs = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]
    return out.reshape(*x.shape).type_as(x)


def differentiable_rope() -> Callable[[], None]:
    """Makes the rotary embedding of ComfyUI's DiTs differentiable for a run; returns the undo.

    Since 0.8 ComfyUI computes RoPE with comfy_kitchen's custom op, which has no backward ("no
    autograd formula was registered"). While gradients are on, the same rotation is computed with
    plain torch ops; without them (sampling) ComfyUI's own op runs. Nothing changes on versions
    whose rope is already plain torch.
    """
    import importlib
    import sys

    importlib.import_module("comfy.ldm.flux.math")
    # Every model module that imported the op by name (Flux's math, Wan, Lumina2 / Z-Image ...).
    modules = [m for n, m in list(sys.modules.items()) if n.startswith("comfy.ldm.") and m is not None]
    patched = []
    for module in modules:
        for name, fn in (
            ("apply_rope1", _rope1),
            ("apply_rope", lambda q, k, f: (_rope1(q, f), _rope1(k, f))),
        ):
            original = getattr(module, name, None)
            if not callable(original) or getattr(original, "__module__", "").startswith("comfy.ldm."):
                continue  # absent, or ComfyUI's own plain-torch fallback

            def either(*args, _own=fn, _original=original):
                return _own(*args) if torch.is_grad_enabled() else _original(*args)

            setattr(module, name, either)
            patched.append((module, name, original))

    def undo() -> None:
        for module, name, original in patched:
            setattr(module, name, original)

    return undo


def plain_cast_linears(model) -> list:
    """The diffusion model's Linears that compute as "cast the stored weight, then linear" (ComfyUI's
    plain and manual-cast ops), for lora_core.train.hooks.recast_frozen_linears. Layers whose class
    computes otherwise (0.3.x's scaled-fp8 and fp8-matmul ops, 0.12's mixed-precision Linear) or
    that carry scales or dynamic-VRAM state are left to their own forward."""
    import comfy.ops

    plain = comfy.ops.disable_weight_init.Linear
    return [
        m
        for m in model.model.diffusion_model.modules()
        if isinstance(m, plain)
        and type(m).forward is plain.forward
        and type(m).forward_comfy_cast_weights is plain.forward_comfy_cast_weights
        and not hasattr(m, "_v")
        and getattr(m, "scale_weight", None) is None
        and getattr(m, "scale_input", None) is None
    ]
