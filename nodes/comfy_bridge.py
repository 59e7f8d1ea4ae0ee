"""The one module that touches ComfyUI internals: key maps, model patching, file lookup, progress.

Everything else in nodes/ goes through these functions, so a change in ComfyUI's internals
is mended here alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

import comfy.lora
import comfy.model_management
import comfy.utils
import comfy.weight_adapter
import folder_paths
import torch

from ..lora_core.patching import Term, apply_terms, apply_terms_

log = logging.getLogger("lora_foundry")


class FoundryPatch(comfy.weight_adapter.WeightAdapterBase):
    """All of a LoRA stack's terms for one weight, applied in one pass when the model loads.

    ModelPatcher calls ``calculate_weight`` lazily (also under low-VRAM loading) on a float32
    copy of the base weight, so the base model itself is never edited.
    """

    name = "lora_foundry"

    def __init__(self, terms: Sequence[Term]):
        self.terms = tuple(terms)
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):  # fmt: skip
        terms = self.terms
        if strength != 1.0:
            terms = tuple(Term(t.adapter, t.strength * strength) for t in terms)
        if function is None and weight.dtype == torch.float32:
            # The usual case: ModelPatcher hands over a float32 working copy; patch it in place.
            new = apply_terms_(terms, weight)
            if new is not weight:
                weight.copy_(new)
            return weight
        new = apply_terms(terms, weight)
        if function is not None:
            # ComfyUI's convention: ``function`` maps the change before it is added.
            new = weight + function(new - weight)
        # In place: with an offset, ComfyUI hands over a narrowed view and keeps the full tensor.
        weight.copy_(new)
        return weight


def unet_key_map(model) -> dict:
    """Names a LoRA file may use for the MODEL's weights -> the model's weight keys."""
    return comfy.lora.model_lora_keys_unet(model.model, {})


def clip_key_map(clip) -> dict:
    """Names a LoRA file may use for the CLIP's weights -> the text encoder's weight keys."""
    return comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})


def weight_shapes(patcher) -> dict[str, tuple[int, ...]]:
    """Shapes of a ModelPatcher's weights by key (no data is copied)."""
    return {k: tuple(v.shape) for k, v in patcher.model.state_dict().items()}


def add_patches(patcher, patches: Mapping[object, Sequence[Term]]) -> int:
    """Adds one FoundryPatch per weight to a (cloned) ModelPatcher; returns how many took."""
    applied = patcher.add_patches({target: FoundryPatch(terms) for target, terms in patches.items()}, 1.0)
    return len(applied)


def model_class_name(model) -> str:
    """ComfyUI's name for the model's architecture (its supported_models class), e.g. 'SD15', 'SDXL'."""
    return type(model.model.model_config).__name__


def model_unet_config(model) -> dict:
    return dict(model.model.model_config.unet_config)


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_path(name: str) -> str:
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise FileNotFoundError(
            f"LoRA '{name}' is not in models/loras (searched: {', '.join(folder_paths.get_folder_paths('loras'))}); "
            "put the file there or refresh the node list"
        )
    return path


def loras_dir() -> str:
    """The first models/loras folder: where new LoRA files are written."""
    return folder_paths.get_folder_paths("loras")[0]


def register_new_lora(path: str) -> str:
    """The name under which a file just written into a loras folder shows in the LoRA lists."""
    for base in folder_paths.get_folder_paths("loras"):
        rel = os.path.relpath(path, base)
        if not rel.startswith(".."):
            return rel.replace(os.sep, "/")
    return os.path.basename(path)


def progress(total: int) -> Callable[..., None]:
    """A step callback driving ComfyUI's progress bar, raising if the user pressed Cancel."""
    bar = comfy.utils.ProgressBar(total)

    def step(done: int, _total: int | None = None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return step
