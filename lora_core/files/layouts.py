"""Whole-file layouts that need their keys renamed before parsing.

A few trainers write LoRA files whose module names no key map knows. ComfyUI core recognises
them by a signature key and renames every key; the same signatures and renames are applied here,
so such files load as they do in core.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

# Wan "Fun" LoRAs (VideoX-Fun): kohya names with a doubled underscore after "lora_unet".
_WAN_FUN_SIGNATURE = "lora_unet__blocks_0_cross_attn_k.lora_down.weight"

# USO (a Flux style LoRA): processor names on Flux's double and single blocks.
_USO_SIGNATURE = (
    "single_blocks.37.processor.qkv_lora.up.weight",
    "double_blocks.18.processor.qkv_lora2.up.weight",
)
_USO_RENAMES = (
    (".down.weight", ".lora_down.weight"),
    (".up.weight", ".lora_up.weight"),
    (".qkv_lora2.", ".txt_attn.qkv."),
    (".qkv_lora1.", ".img_attn.qkv."),
    (".proj_lora1.", ".img_attn.proj."),
    (".proj_lora2.", ".txt_attn.proj."),
    (".qkv_lora.", ".linear1_qkv."),
    (".proj_lora.", ".linear2."),
    (".processor.", "."),
)

# Black Forest Labs' Flux control LoRAs (Canny, Depth): bare Flux names, norm scales replaced
# (set_weight), bias changes (lora_B.bias), and img_in widened for the control image's channels.
_BFL_CONTROL_SIGNATURE = ("img_in.lora_A.weight", "single_blocks.0.norm.key_norm.scale")


def convert_layout(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str | None]:
    """(tensors with renamed keys, the layout's name) for a known whole-file layout, else (tensors, None)."""
    if all(k in tensors for k in _BFL_CONTROL_SIGNATURE):
        out = {}
        for key, value in tensors.items():
            key = key.replace(".lora_B.bias", ".diff_b").replace("_norm.scale", "_norm.scale.set_weight")
            out["diffusion_model." + key] = value
        # img_in grows to take the control image's latent channels next to the noise's (factors
        # that are no matrices, or no pair, get no size here: parsing refuses or skips them by name)
        up, down = tensors.get("img_in.lora_B.weight"), tensors["img_in.lora_A.weight"]
        if up is not None and up.dim() >= 2 and down.dim() >= 2:
            out["diffusion_model.img_in.reshape_weight"] = torch.tensor((up.shape[0], down.shape[1]))
        return out, "Flux control"
    if _WAN_FUN_SIGNATURE in tensors:
        renamed = {("lora_unet_" + k[len("lora_unet__") :] if k.startswith("lora_unet__") else k): v
                   for k, v in tensors.items()}  # fmt: skip
        return renamed, "Wan Fun"
    if all(k in tensors for k in _USO_SIGNATURE):
        out = {}
        for key, value in tensors.items():
            for old, new in _USO_RENAMES:
                key = key.replace(old, new)
            out["diffusion_model." + key] = value
        return out, "USO"
    return dict(tensors), None
