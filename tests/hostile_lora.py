"""Tiny hand-made LoRA files for the hostile-file tests (issue #14)."""

import json
import struct

import torch
from safetensors.torch import save, save_file


def kohya(rank=2, dtype=torch.float32, out=4, inp=3, value=0.1):
    return {
        "lora_unet_a.lora_up.weight": torch.full((out, rank), value).to(dtype),
        "lora_unet_a.lora_down.weight": torch.full((rank, inp), value).to(dtype),
    }


def write(path, tensors, meta=None):
    save_file(tensors, str(path), metadata=meta)
    return path


def write_raw(path, header, data=b""):
    raw = header if isinstance(header, bytes) else header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def split_file(tensors, meta=None):
    """(header dict, data bytes) of the file safetensors writes."""
    blob = save(tensors, metadata=meta)
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def diffusers_lora(paths, rank=2):
    out = {}
    for i, p in enumerate(paths):
        out[f"unet.{p}.lora_A.weight"] = torch.full((rank, 3), 0.1 * (i + 1))
        out[f"unet.{p}.lora_B.weight"] = torch.full((4, rank), 0.1)
    return out
