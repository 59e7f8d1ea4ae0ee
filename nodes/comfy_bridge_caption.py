"""What Caption Dataset's vision-language captioners need from ComfyUI: the models/captioners folder, the
device and dtype to run on, and room on that device (other models unloaded first, --lowvram honoured)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import comfy.model_management as mm
import folder_paths
import torch

CAPTIONERS = "captioners"
HEADROOM = 1.3  # activations and the KV cache beside the weights
log = logging.getLogger("lora_foundry")


def captioner_folders() -> list[str]:
    """models/captioners (registered on first use unless the user set a 'captioners' path, e.g. in
    extra_model_paths.yaml) and any extra ones."""
    if CAPTIONERS not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CAPTIONERS, os.path.join(folder_paths.models_dir, CAPTIONERS))
    return folder_paths.get_folder_paths(CAPTIONERS)


@dataclass(frozen=True)
class Placement:
    """Where a captioner runs and in which dtype; `note` says why when it is not the GPU ComfyUI uses."""

    device: torch.device
    dtype: str
    note: str = ""


def captioner_dtype(device: torch.device) -> str:
    """bf16 where ComfyUI would use it on this device, else fp16, else fp32 (the CPU)."""
    if device.type == "cpu":
        return "float32"
    if mm.should_use_bf16(device, prioritize_performance=True):
        return "bfloat16"
    if mm.should_use_fp16(device, prioritize_performance=True):
        return "float16"
    return "float32"


def _weights_bytes(folder: str) -> int:
    return sum(
        entry.stat().st_size
        for entry in os.scandir(folder)
        if entry.name.endswith(".safetensors") and entry.is_file()
    )


def placement(folder: str) -> Placement:
    """The device and dtype for a captioner's folder; other models are unloaded to make room. With --lowvram or
    --novram the captioner goes to the GPU only if it fits whole once every other model is unloaded; else it
    runs on the CPU (it has no partial-loading path like ComfyUI's own models)."""
    device = mm.get_torch_device()
    if device.type == "cpu":
        return Placement(device, "float32")
    dtype = captioner_dtype(device)
    # Real captioners ship bf16 files: fp32 takes twice their size.
    need = int(_weights_bytes(folder) * (2 if dtype == "float32" else 1) * HEADROOM)
    low = mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM)
    if low:
        mm.unload_all_models()
    else:
        mm.free_memory(need, device)
    mm.soft_empty_cache()
    if mm.get_free_memory(device) < need:
        cpu = torch.device("cpu")
        return Placement(
            cpu, "float32", f"not enough free memory on {device} for the captioner: it ran on the CPU"
        )
    return Placement(device, dtype)


@contextmanager
def on_device(model, device: torch.device) -> Iterator[None]:
    """The model on `device` for a run, then back on the CPU and the cache emptied (also on an error or
    Cancel): the captioner is loaded once per run and holds no GPU memory after it."""
    try:
        model.to(device)
        yield
    finally:
        model.to("cpu")
        mm.soft_empty_cache()
