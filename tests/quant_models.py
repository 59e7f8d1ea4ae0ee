"""Scaled-fp8 checkpoints of a tiny model, written as people download them and loaded by ComfyUI core.

Two layouts (read from ComfyUI 0.12.1's comfy/utils.py convert_old_quants, comfy/ops.py
MixedPrecisionOps and QUANTIZATION.md):

- ``metadata``: each quantized layer's ``weight`` in float8_e4m3fn with a float32 scalar
  ``weight_scale`` beside it, and the header entry ``_quantization_metadata`` =
  ``{"format_version": "1.0", "layers": {"<layer>": {"format": "float8_e4m3fn"}}}``. 0.12 turns
  the header into one ``<layer>.comfy_quant`` tensor per layer and loads the weights as
  comfy-kitchen QuantizedTensors.
- ``scaled_fp8``: the older layout (``model.diffusion_model.scaled_fp8`` marker, ``scale_weight``
  per layer), which 0.12 converts into the one above and 0.3.x loads with its scaled-fp8 ops.

Every 2-D weight of the UNet (its Linear layers) is quantized: scale = max |w| / 448, the
largest float8_e4m3fn value. The checkpoint is then loaded by ``comfy.sd.load_checkpoint_guess_config``
itself; only model detection is told the architecture, since ComfyUI's tables match full-size
SD1.5 and these models are tiny. Nothing here is part of the pack.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import save_file

PREFIX = "model.diffusion_model."
FP8 = torch.float8_e4m3fn
LAYOUTS = ("metadata", "scaled_fp8")


def quantized_state_dict(unet_sd: dict[str, torch.Tensor], layout: str) -> tuple[dict, dict]:
    """(tensors, header metadata) of a checkpoint holding ``unet_sd`` with its Linear weights in fp8."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    tensors, layers = {}, {}
    for key, w in unet_sd.items():
        name = PREFIX + key
        if not (key.endswith(".weight") and w.dim() == 2):
            tensors[name] = w.contiguous()
            continue
        layer = name[: -len(".weight")]
        scale = w.abs().amax().float() / torch.finfo(FP8).max
        tensors[name] = (w.float() / scale).to(FP8)
        tensors[layer + (".weight_scale" if layout == "metadata" else ".scale_weight")] = scale.reshape(())
        layers[layer] = {"format": "float8_e4m3fn"}
    if layout == "scaled_fp8":
        tensors[PREFIX + "scaled_fp8"] = torch.zeros(0, dtype=FP8)  # the marker; its dtype is the format
        return tensors, {}
    return tensors, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}


def write_checkpoint(models, path: Path, layout: str) -> Path:
    """Writes ``models``' UNet as a scaled-fp8 checkpoint in ``layout``; returns the path."""
    tensors, metadata = quantized_state_dict(models.model.model.diffusion_model.state_dict(), layout)
    save_file(tensors, str(path), metadata=metadata or None)
    return path


def load_checkpoint(path: Path, model_config_class):
    """The MODEL as ComfyUI core's checkpoint loader builds it from ``path`` (no CLIP, no VAE), with
    ``model_config_class`` (e.g. comfy.supported_models.SD15) standing in for detection's table match."""
    import comfy.model_detection
    import comfy.sd

    def tiny_match(unet_config, state_dict=None):
        return model_config_class(unet_config)

    # inference mode: ComfyUI runs its loader nodes in it, so the weights are inference tensors
    with (
        mock.patch.object(comfy.model_detection, "model_config_from_unet_config", tiny_match),
        torch.inference_mode(),
    ):
        out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)
    return out[0]


def is_quantized(weight) -> bool:
    """A comfy-kitchen QuantizedTensor (0.8+), or an fp8 tensor of 0.3.x's scaled-fp8 ops."""
    return type(weight).__name__ == "QuantizedTensor" or weight.dtype in (FP8, torch.float8_e5m2)


def dequantized(module, name: str = "weight") -> torch.Tensor:
    """A layer's weight as float32 values, whichever way core stores it."""
    w = getattr(module, name).detach()
    if type(w).__name__ == "QuantizedTensor":
        return w.dequantize().float()
    scale = getattr(module, "scale_weight", None) if name == "weight" else None  # 0.3.x scaled-fp8 ops
    return w.float() * (scale.detach().float() if scale is not None else 1.0)
