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
        self, side: str, source, entries: Sequence[StackEntry], files: Sequence[tuple], plans
    ) -> object:
        """``source`` patched with the plans' ``side``; the last one again when nothing it depends on
        changed (the source object, the files as on disk, this side's strengths, block weights)."""
        strengths = [e.strength_model if side == "unet" else e.strength_clip for e in entries]
        applied = [(*f, float(s), e.block_weights) for f, s, e in zip(files, strengths, entries, strict=True)]
        kept = self.sides.get(side)
        if kept is not None and kept[0] is source and kept[1] == applied:
            return kept[2]
        new = source.clone()
        bridge.add_patches(new, fuse_patches([p.patches[side] for p in plans]))
        self.sides[side] = (source, applied, new)
        return new


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def apply_entries(node: str, model, clip, entries: Sequence[StackEntry], last: LastPatched | None = None):
    """Returns (model, clip, trigger words, report text); ``last``: the node's LastPatched."""
    if not entries:
        return model, clip, "", "no LoRA enabled: MODEL and CLIP pass through unchanged"
    sp = plan_entries(node, model, clip, entries)
    last = last if last is not None else LastPatched()
    files = [(lora.path, *_identity(lora.path)) for lora in sp.loras]
    new_model = last.patched("unet", model, entries, files, sp.plans)
    new_clip = None if clip is None else last.patched("clip", clip, entries, files, sp.plans)
    triggers: list[str] = []
    for lora in sp.loras:
        triggers += [t for t in lora.triggers if t not in triggers]
    report = "\n\n".join(p.report.text() for p in sp.plans)
    return new_model, new_clip, ", ".join(triggers), report
