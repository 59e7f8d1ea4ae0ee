"""The one table of base-model families: ComfyUI's model classes, the label both sides of the base
check use, kohya's ss_base_model_version, modelspec.architecture and the UNet block layout.

Detection reads it (labels from metadata), merged and trained files' metadata is written from it,
the loader's base check maps ComfyUI's class names through it, and the bridge asks it for the
training metadata of a model class.
"""

from __future__ import annotations

from dataclasses import dataclass

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Family:
    label: str  # what detection and the base check compare: "SD1.x", "SDXL", ...
    comfy_classes: tuple[str, ...]  # comfy.supported_models class names of this family
    base_model_version: str | None  # kohya ss_base_model_version written for it
    version_prefix: str | None  # an ss_base_model_version read as this family starts with it
    architecture: str | None  # modelspec.architecture written for its LoRAs
    architecture_needle: str | None  # a modelspec.architecture read as this family contains it
    block_layout: str | None = None  # the UNet block layout its block weights name ("SD", "SDXL")


# Reading order matters: the refiner's architecture contains SDXL's needle, so it comes first.
FAMILIES: tuple[Family, ...] = (
    Family("SDXL Refiner", ("SDXLRefiner",), None, None, None, "stable-diffusion-xl-v1-refiner"),
    Family("SDXL", ("SDXL", "SDXL_instructpix2pix"), "sdxl_base_v1-0", "sdxl",
           "stable-diffusion-xl-v1-base/lora", "stable-diffusion-xl", "SDXL"),
    Family("SD1.x", ("SD15", "SD15_instructpix2pix"), "sd_v1", "sd_v1",
           "stable-diffusion-v1/lora", "stable-diffusion-v1", "SD"),
    Family("SD2.x", ("SD20", "SD21UnclipL", "SD21UnclipH"), "sd_v2", "sd_v2",
           "stable-diffusion-v2/lora", "stable-diffusion-v2", "SD"),
    Family("SD3", ("SD3",), "sd3", "sd3", None, "stable-diffusion-3"),
    Family("Flux", ("Flux", "FluxInpaint", "FluxSchnell"), "flux1", "flux", None, "flux"),
)  # fmt: skip
_BY_LABEL = {f.label: f for f in FAMILIES}
_BY_CLASS = {name: f for f in FAMILIES for name in f.comfy_classes}


def by_label(label: str) -> Family | None:
    return _BY_LABEL.get(label)


def by_comfy_class(class_name: str) -> Family | None:
    """The family of ComfyUI's model class (``type(model.model.model_config).__name__``), or None."""
    return _BY_CLASS.get(class_name)


def from_architecture(architecture: str) -> Family | None:
    """The family a file's modelspec.architecture names (lower-cased), or None."""
    return next(
        (f for f in FAMILIES if f.architecture_needle and f.architecture_needle in architecture), None
    )


def from_base_version(version: str) -> Family | None:
    """The family a file's ss_base_model_version names (lower-cased), or None."""
    return next((f for f in FAMILIES if f.version_prefix and version.startswith(f.version_prefix)), None)


def training_metadata_for_class(class_name: str) -> dict[str, str]:
    """What a LoRA trained on ComfyUI's model class ``class_name`` records of its base: kohya's
    ``ss_base_model_version`` (the class name, lower-cased, for a class the table does not know, as
    before) and, where the table has one, ``modelspec.architecture``. A trainer passes these on as
    RunInfo(base_model_version=..., modelspec_architecture=...)."""
    family = by_comfy_class(class_name)
    out = {"ss_base_model_version": (family and family.base_model_version) or class_name.lower()}
    if family is not None and family.architecture is not None:
        out["modelspec.architecture"] = family.architecture
    return out
