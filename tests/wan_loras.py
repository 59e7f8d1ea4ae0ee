"""Tiny Wan 2.2 expert pairs and LoRA files for them, written as musubi-tuner names its Wan LoRAs
(kohya ``lora_unet_`` names, ``modelspec.timestep_range`` when trained on a timestep range)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file


def wan_lora(model, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """Random kohya-named factors for every 2-D weight ComfyUI's key map gives a ``lora_unet_`` name."""
    import comfy.lora

    g = torch.Generator().manual_seed(seed)
    sd = model.model.state_dict()
    out, seen = {}, set()
    for name, target in sorted(comfy.lora.model_lora_keys_unet(model.model, {}).items()):
        if not isinstance(target, str) or not name.startswith("lora_unet_") or target in seen:
            continue
        if target not in sd or sd[target].ndim != 2:
            continue
        seen.add(target)
        rows, cols = sd[target].shape
        out[f"{name}.lora_down.weight"] = torch.randn(rank, cols, generator=g) * 0.1
        out[f"{name}.lora_up.weight"] = torch.randn(rows, rank, generator=g) * 0.1
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def write_pair(
    folder, model, stem: str, seed: int = 0, ranges: tuple[str, str] | None = None
) -> tuple[str, str]:
    """(high file, low file) named ``<stem>_high_noise`` / ``<stem>_low_noise``; with ``ranges``, their
    ``modelspec.timestep_range`` headers."""
    names = []
    for i, side in enumerate(("high", "low")):
        name = f"{stem}_{side}_noise.safetensors"
        metadata = {"modelspec.timestep_range": ranges[i]} if ranges else None
        tensors = {k: v.contiguous() for k, v in wan_lora(model, seed + i).items()}
        save_file(tensors, str(folder / name), metadata=metadata)
        names.append(name)
    return names[0], names[1]
