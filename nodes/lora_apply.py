"""Planning LoRA entries against MODEL and CLIP (shared by Load LoRA, Apply LoRA Stack and Merge
LoRAs) and applying them: every entry is parsed once (cached), resolved and checked against the
model's family by lora_core; all entries' terms for one weight then become one fused patch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..lora_core.detect import FamilyGuess
from ..lora_core.loader import LoadedLora, LoraMismatchError, LoraPlan, load_lora, model_family, plan_lora
from ..lora_core.lorafile import LoraFileError
from ..lora_core.stack import StackEntry, fuse_patches
from . import comfy_bridge as bridge


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
    loras, plans = [], []
    for e in entries:
        try:
            lora = load_lora(bridge.lora_path(e.lora_name))
            strengths = {"unet": e.strength_model, "clip": e.strength_clip}
            plans.append(plan_lora(lora, key_maps, strengths, family, e.block_weights, shapes))
        except (LoraFileError, LoraMismatchError, FileNotFoundError, ValueError) as err:
            raise RuntimeError(f"[{node}] {err}") from err
        loras.append(lora)
    return StackPlan(tuple(loras), tuple(plans), key_maps, shapes, family)


def apply_entries(node: str, model, clip, entries: Sequence[StackEntry]):
    """Returns (model, clip, trigger words, report text)."""
    if not entries:
        return model, clip, "", "no LoRA enabled: MODEL and CLIP pass through unchanged"
    sp = plan_entries(node, model, clip, entries)
    new_model = model.clone()
    bridge.add_patches(new_model, fuse_patches([p.patches["unet"] for p in sp.plans]))
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        bridge.add_patches(new_clip, fuse_patches([p.patches["clip"] for p in sp.plans]))
    triggers: list[str] = []
    for lora in sp.loras:
        triggers += [t for t in lora.triggers if t not in triggers]
    report = "\n\n".join(p.report.text() for p in sp.plans)
    return new_model, new_clip, ", ".join(triggers), report
