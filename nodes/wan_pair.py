"""Wan 2.2 LoRA Pair: a high-noise and a low-noise LoRA (or stack) onto Wan 2.2's two expert models."""

from __future__ import annotations

from ..lora_core.apply.loader import load_lora
from ..lora_core.apply.stack import StackEntry, read_stack
from ..lora_core.apply.wan_pair import HIGH, LOW, check_side
from ..lora_core.files.lorafile import LoraFileError
from . import comfy_bridge as bridge
from .load_lora import CATEGORY, STRENGTH, mode_input
from .lora_apply import PATCH, LastPatched, apply_entries, check_mode

NODE = "Wan 2.2 LoRA Pair"
NONE = "None"
SIDE_RULE = (
    "Wan 2.2's two experts have the same layers, so the pair is told apart by the LoRA files: the timesteps "
    "they were trained on (musubi-tuner's modelspec.timestep_range, or ss_min/max_timestep: starting at 800 "
    "or above = high-noise, ending at 900 or below = low-noise), else a word in the file name (high, "
    "high_noise, HighNoise, HN / low, low_noise, LowNoise, LN). A file found to be for the other expert is "
    "refused; one that tells nothing is applied and the report says so."
)


def _side_inputs(side: str, expert: str) -> dict:
    return {
        f"lora_{side}": ([NONE, *bridge.lora_names()], {"tooltip": f"The {expert} LoRA of the pair (None: only the stack)."}),
        f"strength_{side}": ("FLOAT", {**STRENGTH, "tooltip": f"Strength of lora_{side} on the {expert} model."}),
    }  # fmt: skip


class WanLoraPair:
    DESCRIPTION = (
        "Applies a high-noise and a low-noise LoRA (or LORA_STACK) to Wan 2.2's high-noise and low-noise "
        "models, each with its own strength, and refuses a pair put on the wrong sides. " + SIDE_RULE
    )
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("MODEL", "MODEL", "STRING")
    RETURN_NAMES = ("model_high", "model_low", "report")
    OUTPUT_TOOLTIPS = (
        "The high-noise model with its LoRAs: the first sampler (early, noisy steps).",
        "The low-noise model with its LoRAs: the second sampler (late steps).",
        "Which expert each file was read as, and each LoRA's load report.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model_high": ("MODEL", {"tooltip": "Wan 2.2's high-noise expert (e.g. wan2.2_t2v_high_noise_14B)."}),
            "model_low": ("MODEL", {"tooltip": "Wan 2.2's low-noise expert (e.g. wan2.2_t2v_low_noise_14B)."}),
            **_side_inputs("high", "high-noise"),
            **_side_inputs("low", "low-noise"),
        }  # fmt: skip
        optional = {
            "stack_high": ("LORA_STACK", {"tooltip": "More high-noise LoRAs, each at its own model strength. " + SIDE_RULE}),
            "stack_low": ("LORA_STACK", {"tooltip": "More low-noise LoRAs, each at its own model strength."}),
            **mode_input(),
        }  # fmt: skip
        return {"required": required, "optional": optional}

    def __init__(self):
        self.last = {HIGH: LastPatched(), LOW: LastPatched()}

    def execute(self, model_high, model_low, lora_high, strength_high, lora_low, strength_low,
                stack_high=None, stack_low=None, apply_mode=PATCH):  # fmt: skip
        check_mode(NODE, apply_mode)
        _check_models(model_high, model_low)
        outputs, lines = [], []
        for expert, model, name, strength, stack in (
            (HIGH, model_high, lora_high, strength_high, stack_high),
            (LOW, model_low, lora_low, strength_low, stack_low),
        ):
            entries = _entries(expert, name, strength, stack)
            lines.append(f"{expert} side:")
            lines += ["  " + line for line in _sides(expert, entries)]
            new, _, _, report = apply_entries(NODE, model, None, entries, self.last[expert], apply_mode)
            outputs.append(new)
            lines.append(report)
        report = "\n".join(lines)
        return {"ui": {"text": [report]}, "result": (*outputs, report)}


def _check_models(model_high, model_low) -> None:
    for slot, model in (("model_high", model_high), ("model_low", model_low)):
        kind = bridge.model_class_name(model)
        if not kind.upper().startswith("WAN"):
            raise RuntimeError(
                f"[{NODE}] {slot} is a {kind} model, not Wan: connect Wan 2.2's two expert models"
            )
    if model_high.is_clone(model_low):
        raise RuntimeError(
            f"[{NODE}] model_high and model_low are the same model: load Wan 2.2's high-noise and low-noise "
            "experts (two files) and connect one to each"
        )


def _entries(expert: str, name: str, strength: float, stack) -> list[StackEntry]:
    side = "high" if expert == HIGH else "low"
    try:
        entries = read_stack(stack)
    except ValueError as e:
        raise RuntimeError(f"[{NODE}] stack_{side}: {e}") from e
    if name and name != NONE:
        entries.insert(0, StackEntry(name, strength, 0.0))
    return entries


def _sides(expert: str, entries: list[StackEntry]) -> list[str]:
    """Each entry read as high- or low-noise; a RuntimeError when one belongs on the other side."""
    files = []
    for e in entries:
        try:
            files.append((e.lora_name, load_lora(bridge.lora_path(e.lora_name)).metadata))
        except (LoraFileError, FileNotFoundError, ValueError) as err:
            raise RuntimeError(f"[{NODE}] {err}") from err
    slot = "lora_high / stack_high" if expert == HIGH else "lora_low / stack_low"
    try:
        return check_side(slot, expert, files)
    except ValueError as err:
        raise RuntimeError(f"[{NODE}] {err}") from err
