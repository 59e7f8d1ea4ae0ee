"""LoRA Stack (build a LORA_STACK, chainable) and Apply LoRA Stack (one fused patch per weight)."""

from __future__ import annotations

from ..lora_core.apply.stack import MAX_ROWS, ROWS, StackEntry, read_rows, read_stack, to_stack_items
from . import comfy_bridge as bridge
from .load_lora import BLOCK_WEIGHTS_TIP, CATEGORY, STRENGTH, check_block_weights, mode_input
from .lora_apply import APPLIED_NAMES, APPLIED_TYPES, PATCH, LastPatched, apply_entries

SLOTS = 4
NONE = "None"
ROWS_TIP = (
    "More entries as a JSON list of rows, each {lora, on, strength_model, strength_clip, block_weights}; "
    f"the row widget of the pack's frontend writes it. Rows come after the slots above (at most {MAX_ROWS})."
)


def _slot_inputs(i: int) -> dict:
    return {
        f"lora_{i}": ([NONE, *bridge.lora_names()], {"tooltip": f"LoRA of entry {i} (None: unused)."}),
        f"on_{i}": ("BOOLEAN", {"default": True, "tooltip": f"Switch entry {i} on or off without losing its settings."}),
        f"strength_model_{i}": ("FLOAT", {**STRENGTH, "tooltip": f"Strength of entry {i} on the model."}),
        f"strength_clip_{i}": ("FLOAT", {**STRENGTH, "tooltip": f"Strength of entry {i} on the text encoder."}),
        f"block_weights_{i}": ("STRING", {"default": "", "tooltip": BLOCK_WEIGHTS_TIP}),
    }  # fmt: skip


class LoraStack:
    DESCRIPTION = (
        f"Collects up to {SLOTS} LoRAs with their own strengths into a LORA_STACK; chain several "
        "stacks for more. Accepts and produces the LORA_STACK lists other packs use."
    )
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("LORA_STACK",)
    RETURN_NAMES = ("lora_stack",)
    OUTPUT_TOOLTIPS = ("The incoming stack followed by this node's enabled entries.",)

    @classmethod
    def INPUT_TYPES(cls):
        optional = {
            "lora_stack": ("LORA_STACK", {"tooltip": "A stack to extend (from this or another pack)."})
        }
        for i in range(1, SLOTS + 1):
            optional.update(_slot_inputs(i))
        optional[ROWS] = ("STRING", {"default": "", "tooltip": ROWS_TIP})
        return {"required": {}, "optional": optional}

    def execute(self, lora_stack=None, **slots):
        try:
            entries = read_stack(lora_stack)
            rows = read_rows(slots.pop(ROWS, ""))
        except ValueError as e:
            raise RuntimeError(f"[LoRA Stack] {e}") from e
        for i in range(1, SLOTS + 1):
            name = slots.get(f"lora_{i}", NONE)
            if name != NONE and slots.get(f"on_{i}", True):
                entries.append(
                    StackEntry(
                        name,
                        slots.get(f"strength_model_{i}", 1.0),
                        slots.get(f"strength_clip_{i}", 1.0),
                        slots.get(f"block_weights_{i}", ""),
                    )
                )
        return (to_stack_items(entries + rows),)


class ApplyLoraStack:
    DESCRIPTION = (
        "Applies every LoRA of a LORA_STACK at once: all entries touching a weight become one patch."
    )
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = APPLIED_TYPES
    RETURN_NAMES = APPLIED_NAMES
    OUTPUT_TOOLTIPS = (
        "The model with the stack applied.",
        "The text encoder with the stack applied (None when no CLIP was connected).",
        "Trigger words of the enabled LoRAs, from their metadata.",
        "One report per LoRA: format, base model, layers matched, anything skipped.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to apply the stack to."}),
                "lora_stack": (
                    "LORA_STACK",
                    {"tooltip": "Entries from LoRA Stack nodes (or another pack's)."},
                ),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoder; leave unconnected to patch the model only."}),
                **mode_input(),
            },
        }

    def __init__(self):
        self.last = LastPatched()  # a change on one side only re-patches that side

    def execute(self, model, lora_stack, clip=None, apply_mode=PATCH):
        try:
            entries = read_stack(lora_stack)
        except ValueError as e:
            raise RuntimeError(f"[Apply LoRA Stack] {e}") from e
        check_block_weights("Apply LoRA Stack", model, entries)
        out = apply_entries("Apply LoRA Stack", model, clip, entries, self.last, apply_mode)
        return {"ui": {"text": [out[3]], "trigger_words": [out[2]]}, "result": out}
