"""Comparing patched weights: what a ModelPatcher would load, key by key, against another patcher."""

from __future__ import annotations

import re

import comfy.lora
import lora_factory as lf
import torch
from safetensors.torch import save_file

from lora_foundry.nodes.load_lora import LoadLora

TOL = 1e-5


def run_ours(models, name, sm, sc):
    """Load LoRA on the models' MODEL and CLIP: (model, clip, report)."""
    model, clip, _, report = LoadLora().execute(models.model, name, sm, sc, clip=models.clip)["result"]
    return model, clip, report


def matched_count(report: str) -> int:
    """The number of modules the report's "matched:" line counts, over all parts."""
    line = next(x for x in report.splitlines() if x.startswith("matched:"))
    return sum(int(n) for n in re.findall(r"\d+", line))


def patched(patcher) -> dict[str, torch.Tensor]:
    """The weights a ModelPatcher would load, computed from its pending patches."""
    patcher = getattr(patcher, "patcher", patcher)  # a CLIP holds its ModelPatcher
    sd = patcher.model.state_dict()
    return {k: comfy.lora.calculate_weight(v, sd[k].float().clone(), k) for k, v in patcher.patches.items()}


def assert_same(ours: dict, core: dict) -> None:
    assert set(ours) == set(core), (
        f"only ours: {sorted(set(ours) - set(core))[:5]}, only core: {sorted(set(core) - set(ours))[:5]}"
    )
    assert ours, "nothing was patched"
    for k in core:
        diff = (ours[k] - core[k]).abs().max().item()
        assert diff <= TOL, f"{k}: max abs diff {diff}"


def write(loras_dir, name: str, sd: dict, metadata: dict | None = None) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(loras_dir / name), metadata=metadata)
    return name


def modules(models, convs=False):
    return lf.unet_modules(models, attn_only=False, convs=convs) + lf.clip_modules(models)
