"""Load LoRA nodes: one LoRA onto MODEL (and CLIP), with a report of what matched."""

from __future__ import annotations

from collections.abc import Sequence

from ..lora_core.apply.block_weights import parse_block_weights
from ..lora_core.apply.stack import StackEntry
from . import comfy_bridge as bridge
from .lora_apply import APPLIED_NAMES, APPLIED_TYPES, MODE_TIP, MODES, PATCH, LastPatched, apply_entries

CATEGORY = "LoRA Foundry"
STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
BLOCK_WEIGHTS_TIP = (
    "Optional per-block weights. A preset (e.g. ALL, INALL, MIDD, OUTALL), the numeric vector the "
    "Inspire pack's LoRA Block Weight node uses (17 numbers for SD1.x, 12 for SDXL), or a readable "
    "form like 'in=0.5, mid=1, out=0.8'. On DiT models: 'double=0.5, single0-10=1, single11-37=0' (Flux, "
    "Flux.2, Chroma), joint= (SD3), layer= (Z-Image), block= (Wan, Qwen-Image), blocks counted from 0, "
    "or Inspire's Flux vector (BASE, 19 double, 38 single). Empty: every block at full strength."
)


def lora_inputs(with_clip: bool) -> dict:
    required = {
        "model": ("MODEL", {"tooltip": "The diffusion model (UNet) to apply the LoRA to."}),
        "lora_name": (bridge.lora_names(), {"tooltip": "A LoRA file from models/loras (subfolders included)."}),
        "strength_model": ("FLOAT", {**STRENGTH, "tooltip": "How strongly the LoRA changes the model; 0 disables it, negative inverts it."}),
    }  # fmt: skip
    optional = {"block_weights": ("STRING", {"default": "", "tooltip": BLOCK_WEIGHTS_TIP})}
    if with_clip:
        required["strength_clip"] = (
            "FLOAT",
            {**STRENGTH, "tooltip": "How strongly the LoRA changes the text encoder."},
        )
        optional = {
            "clip": ("CLIP", {"tooltip": "The text encoder; leave unconnected to patch the model only."}),
            **optional,
        }
    optional.update(mode_input())
    return {"required": required, "optional": optional}


def mode_input() -> dict:
    """The apply_mode widget: kept the last input, so workflows saved before it existed (whose widget
    values list stops before it) load with every earlier value in place and this one at its default."""
    return {"apply_mode": (list(MODES), {"default": PATCH, "tooltip": MODE_TIP})}


def check_block_weights(node: str, model, entries: Sequence[StackEntry]) -> None:
    """Every entry's block weights checked against MODEL's real blocks before a file is read (the
    loader checks the spec against the family again; models without UNet blocks are left to it)."""
    counts = bridge.unet_block_counts(model)
    for e in entries:
        if counts is not None and e.block_weights.strip():
            try:
                parse_block_weights(e.block_weights, counts=counts)
            except ValueError as err:
                raise RuntimeError(f"[{node}] {e.lora_name}: {err}") from err


def apply_lora(
    node: str, model, clip, lora_name: str, strength_model: float, strength_clip: float, block_weights: str,
    last: LastPatched | None = None, mode: str = PATCH,
):  # fmt: skip
    """Returns (model, clip, trigger words, report text)."""
    entries = [StackEntry(lora_name, strength_model, strength_clip, block_weights)]
    check_block_weights(node, model, entries)
    return apply_entries(node, model, clip, entries, last, mode)


class LoadLora:
    DESCRIPTION = (
        "Applies a LoRA file (kohya, LyCORIS, diffusers, PEFT) to MODEL and CLIP and reports what matched."
    )
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = APPLIED_TYPES
    RETURN_NAMES = APPLIED_NAMES
    OUTPUT_TOOLTIPS = (
        "The model with the LoRA applied.",
        "The text encoder with the LoRA applied (None when no CLIP was connected).",
        "Trigger words the LoRA was trained with, from its metadata; put them in your prompt.",
        "What was loaded: format, base model, layers matched per part and anything skipped.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return lora_inputs(with_clip=True)

    def __init__(self):
        self.last = LastPatched()  # a change on one side only re-patches that side

    def execute(
        self, model, lora_name, strength_model, strength_clip, clip=None, block_weights="", apply_mode=PATCH
    ):
        out = apply_lora(
            "Load LoRA",
            model,
            clip,
            lora_name,
            strength_model,
            strength_clip,
            block_weights,
            self.last,
            apply_mode,
        )
        return {"ui": {"text": [out[3]], "trigger_words": [out[2]]}, "result": out}


class LoadLoraModelOnly:
    DESCRIPTION = "Applies a LoRA file to the diffusion model only (no text encoder)."
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("MODEL", "STRING", "STRING")
    RETURN_NAMES = ("MODEL", "trigger_words", "report")
    OUTPUT_TOOLTIPS = LoadLora.OUTPUT_TOOLTIPS[:1] + LoadLora.OUTPUT_TOOLTIPS[2:]

    @classmethod
    def INPUT_TYPES(cls):
        return lora_inputs(with_clip=False)

    def __init__(self):
        self.last = LastPatched()

    def execute(self, model, lora_name, strength_model, block_weights="", apply_mode=PATCH):
        m, _, triggers, report = apply_lora(
            "Load LoRA (model only)",
            model,
            None,
            lora_name,
            strength_model,
            0.0,
            block_weights,
            self.last,
            apply_mode,
        )
        return {"ui": {"text": [report], "trigger_words": [triggers]}, "result": (m, triggers, report)}
