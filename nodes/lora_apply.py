"""Applying LoRA entries to MODEL and CLIP: shared by Load LoRA and Apply LoRA Stack.

Every entry is planned by lora_core (parsed once and cached, resolved, checked against the
model's family); all entries' terms for one weight then become one fused patch.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..lora_core.loader import LoraMismatchError, load_lora, model_family, plan_lora
from ..lora_core.lorafile import LoraFileError
from ..lora_core.stack import StackEntry, fuse_patches
from . import comfy_bridge as bridge


def apply_entries(node: str, model, clip, entries: Sequence[StackEntry]):
    """Returns (model, clip, trigger words, report text); errors are raised with the node's name."""
    if not entries:
        return model, clip, "", "no LoRA enabled: MODEL and CLIP pass through unchanged"
    key_maps = {"unet": bridge.unet_key_map(model)}
    shapes = {"unet": bridge.weight_shapes(model)}
    if clip is not None:
        key_maps["clip"] = bridge.clip_key_map(clip)
        shapes["clip"] = bridge.weight_shapes(clip.patcher)
    family = model_family(bridge.model_class_name(model), bridge.model_unet_config(model))
    plans, triggers = [], []
    for e in entries:
        try:
            lora = load_lora(bridge.lora_path(e.lora_name))
            strengths = {"unet": e.strength_model, "clip": e.strength_clip}
            plans.append(plan_lora(lora, key_maps, strengths, family, e.block_weights, shapes))
        except (LoraFileError, LoraMismatchError, FileNotFoundError, ValueError) as err:
            raise RuntimeError(f"[{node}] {err}") from err
        triggers += [t for t in lora.triggers if t not in triggers]
    new_model = model.clone()
    bridge.add_patches(new_model, fuse_patches([p.patches["unet"] for p in plans]))
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        bridge.add_patches(new_clip, fuse_patches([p.patches["clip"] for p in plans]))
    report = "\n\n".join(p.report.text() for p in plans)
    return new_model, new_clip, ", ".join(triggers), report
