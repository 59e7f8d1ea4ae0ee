"""Planning LoRA entries against MODEL and CLIP (shared by Load LoRA, Apply LoRA Stack and Merge
LoRAs) and applying them: every entry is parsed once (cached), resolved and checked against the
model's family by lora_core; all entries' terms for one weight then become one fused patch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..lora_core.apply.loader import (
    LoadedLora,
    LoraMismatchError,
    LoraPlan,
    load_lora,
    model_family,
    plan_lora,
)
from ..lora_core.apply.stack import StackEntry, fuse_patches
from ..lora_core.files.detect import FamilyGuess
from ..lora_core.files.lorafile import LoraFileError
from . import comfy_bridge as bridge
from . import comfy_bridge_bypass as bypass

# How a node applies its LoRAs (its ``apply_mode`` widget). The first is the default: what the nodes
# always did, so graphs saved before the option existed run as they did.
PATCH = "patch weights"
BYPASS = "bypass"
BYPASS_OR_PATCH = "bypass (patch what cannot)"
MODES = (PATCH, BYPASS, BYPASS_OR_PATCH)
# The outputs of every node that ends in apply_entries: (model, clip, trigger words, report).
APPLIED_TYPES = ("MODEL", "CLIP", "STRING", "STRING")
APPLIED_NAMES = ("MODEL", "CLIP", "trigger_words", "report")
MODE_TIP = (
    "patch weights: the LoRA is added into a copy of each weight it changes (ComfyUI's usual way). "
    "bypass: the weights stay as they are and the LoRA runs on each layer's activations "
    "(y = W x + s*B(A x)), so a quantized (fp8, GGUF) or offloaded base is never copied or dequantized; "
    "DoRA, OFT, BOFT, GLoRA and set_weight depend on the weight and are refused with an error. "
    "bypass (patch what cannot): the same, but those few are patched into their weights instead."
)


@dataclass(frozen=True)
class StackPlan:
    loras: tuple[LoadedLora, ...]
    plans: tuple[LoraPlan, ...]
    key_maps: dict
    shapes: dict
    family: FamilyGuess


def plan_entries(node: str, model, clip, entries: Sequence[StackEntry]) -> StackPlan:
    """Plans every entry; errors are raised with the node's name and the file's."""
    key_maps = {"unet": bridge.unet_key_map(model)}
    shapes = {"unet": bridge.weight_shapes(model)}
    if clip is not None:
        key_maps["clip"] = bridge.clip_key_map(clip)
        shapes["clip"] = bridge.weight_shapes(clip.patcher)
    family = model_family(bridge.model_class_name(model), bridge.model_unet_config(model))
    dtypes = {"unet": model.model_dtype()}  # the report names changes these weights cannot hold
    loras, plans = [], []
    for e in entries:
        try:
            lora = load_lora(bridge.lora_path(e.lora_name))
            strengths = {"unet": e.strength_model, "clip": e.strength_clip}
            plans.append(plan_lora(lora, key_maps, strengths, family, e.block_weights, shapes, dtypes,
                                   model_class=bridge.model_class_name(model)))  # fmt: skip
        except (LoraFileError, LoraMismatchError, FileNotFoundError, ValueError) as err:
            raise RuntimeError(f"[{node}] {err}") from err
        loras.append(lora)
    return StackPlan(tuple(loras), tuple(plans), key_maps, shapes, family)


@dataclass
class LastPatched:
    """A node's last patched MODEL and CLIP, each with its source object and what was applied.

    When a run changes only one side (say strength_model), the other side's object is handed out
    again, and ComfyUI, which finds it already loaded with the same patches, does not patch that
    model a second time. Held per node instance, so it pins nothing ComfyUI's own output cache
    does not already hold.
    """

    sides: dict = field(default_factory=dict)  # "unet" / "clip" -> (source, applied, patched)

    def patched(
        self,
        side: str,
        source,
        entries: Sequence[StackEntry],
        files: Sequence[tuple],
        plans,
        mode: str = PATCH,
    ) -> tuple[object, str]:
        """(``source`` with the plans' ``side`` applied in ``mode``, a note for the report); the last
        ones again when nothing they depend on changed (the source object, the files as on disk, this
        side's strengths, block weights, the mode)."""
        strengths = [e.strength_model if side == "unet" else e.strength_clip for e in entries]
        applied = [(*f, float(s), e.block_weights) for f, s, e in zip(files, strengths, entries, strict=True)]
        applied.append(mode)
        kept = self.sides.get(side)
        if kept is not None and kept[0] is source and kept[1] == applied:
            return kept[2], kept[3]
        new = source.clone()
        patches = fuse_patches([p.patches[side] for p in plans])
        note = ""
        if mode == PATCH:
            bridge.add_patches(new, patches)
        else:
            note = bypass.apply_bypass(new, patches, fallback=mode == BYPASS_OR_PATCH).note(side)
        self.sides[side] = (source, applied, new, note)
        return new, note


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def check_mode(node: str, mode: str) -> str:
    if mode not in MODES:
        raise RuntimeError(f"[{node}] apply_mode {str(mode)[:40]!r} is not one of: {', '.join(MODES)}")
    return mode


def apply_entries(
    node: str, model, clip, entries: Sequence[StackEntry], last: LastPatched | None = None, mode: str = PATCH
):
    """Returns (model, clip, trigger words, report text); ``last``: the node's LastPatched; ``mode``: one of MODES."""
    check_mode(node, mode)
    if not entries:
        return model, clip, "", "no LoRA enabled: MODEL and CLIP pass through unchanged"
    sp = plan_entries(node, model, clip, entries)
    last = last if last is not None else LastPatched()
    files = [(lora.path, *_identity(lora.path)) for lora in sp.loras]
    try:
        new_model, notes = last.patched("unet", model, entries, files, sp.plans, mode)
        notes = [notes]
        new_clip = None
        if clip is not None:
            new_clip, clip_note = last.patched("clip", clip, entries, files, sp.plans, mode)
            notes.append(clip_note)
    except ValueError as err:  # bypass mode refusing weight-dependent adapters
        raise RuntimeError(f"[{node}] {err}") from err
    triggers: list[str] = []
    for lora in sp.loras:
        triggers += [t for t in lora.triggers if t not in triggers]
    report = "\n\n".join([p.report.text() for p in sp.plans] + [n for n in notes if n])
    return new_model, new_clip, ", ".join(triggers), report
