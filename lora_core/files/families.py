"""The one table of base-model families: ComfyUI's model classes, the label both sides of the base
check use, kohya's ss_base_model_version, modelspec.architecture, the UNet block layout and the
other families whose LoRAs a family's models run.

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
    version_prefix: (
        str | tuple[str, ...] | None
    )  # an ss_base_model_version read as this family starts with one
    architecture: str | None  # modelspec.architecture written for its LoRAs
    architecture_needle: str | None  # a modelspec.architecture read as this family contains it
    block_layout: str | None = None  # the UNet block layout its block weights name ("SD", "SDXL")
    takes: tuple[str, ...] = ()  # labels of other families whose LoRAs this family's models run


# What the ecosystem writes for the DiT families (read as lower case), where a trainer writes one:
# - musubi-tuner src/musubi_tuner/utils/sai_model_spec.py, modelspec.architecture + "/lora":
#   "wan2.1" (every Wan, 2.1 and 2.2), "Qwen-Image" / "Qwen-Image-Edit[-Plus|-2511]" / "Qwen-Image-Layered",
#   "Flux.2-dev" / "Flux.2-klein-4b" / "Flux.2-klein-9b", "hunyuan-video-1.5", "Z-Image" (and
#   "hunyuan-video", "Flux.1-dev" for HunyuanVideo 1.0 and Kontext);
# - kohya sd-scripts library/sai_model_spec.py: "chroma" (ARCH_FLUX_1_CHROMA), "lumina-2";
#   lumina_train_network.py passes lumina="lumina2";
# - ai-toolkit writes its model arch name as ss_base_model_version ("flux2_klein_9b" seen in files).
# The DiT rows write no modelspec.architecture (as SD3's and Flux's): the trainer writes no
# modelspec.implementation of its own for them, so only ss_base_model_version is written; the
# needles still read the values above. Their written ss_base_model_version is the lower-cased
# ComfyUI class name the trainer wrote before these rows existed ("flux2", "chroma", "zimage",
# "lumina2", "hidream", "ltxv", "hunyuanvideo15"), except where that named one model of a family
# ("wan21_t2v" -> "wan") or is spelt otherwise by the tools ("qwenimage" -> "qwen_image").

# Reading order matters: the refiner's architecture contains SDXL's needle, so it comes first;
# Flux.2's versions ("flux2...") start with Flux's prefix and its architecture ("flux.2-dev")
# contains Flux's needle, so it comes before Flux; HunyuanVideo 1.5's needle before any
# "hunyuan-video" one.
FAMILIES: tuple[Family, ...] = (
    Family("SDXL Refiner", ("SDXLRefiner",), None, None, None, "stable-diffusion-xl-v1-refiner"),
    Family("SDXL", ("SDXL", "SDXL_instructpix2pix"), "sdxl_base_v1-0", "sdxl",
           "stable-diffusion-xl-v1-base/lora", "stable-diffusion-xl", "SDXL"),
    Family("SD1.x", ("SD15", "SD15_instructpix2pix"), "sd_v1", "sd_v1",
           "stable-diffusion-v1/lora", "stable-diffusion-v1", "SD"),
    Family("SD2.x", ("SD20", "SD21UnclipL", "SD21UnclipH"), "sd_v2", "sd_v2",
           "stable-diffusion-v2/lora", "stable-diffusion-v2", "SD"),
    Family("SD3", ("SD3",), "sd3", "sd3", None, "stable-diffusion-3"),
    Family("Flux.2", ("Flux2",), "flux2", ("flux2", "flux.2", "flux_2"), None, "flux.2"),
    Family("Flux", ("Flux", "FluxInpaint", "FluxSchnell"), "flux1", "flux", None, "flux"),
    # Chroma is Flux.1 (schnell) with its per-block modulation layers replaced by one
    # distilled_guidance_layer: a Flux LoRA's double / single block layers all exist in it.
    Family("Chroma", ("Chroma", "ChromaRadiance"), "chroma", "chroma", None, "chroma", takes=("Flux",)),
    # Z-Image and Lumina 2 share ComfyUI's lumina2 model and its layer names, not their widths.
    Family("Z-Image", ("ZImage",), "zimage", ("zimage", "z_image", "z-image"), None, "z-image"),
    Family("Lumina 2", ("Lumina2",), "lumina2", "lumina", None, "lumina"),
    Family("Qwen-Image", ("QwenImage",), "qwen_image", ("qwen_image", "qwenimage", "qwen-image"), None,
           "qwen-image"),
    # Wan 2.1 and 2.2 (both experts of A14B, and the 5B) have the same block names: one family;
    # a 14B LoRA on the 5B is refused by its shapes, not its family.
    Family("Wan", ("WAN21_T2V", "WAN21_I2V", "WAN21_FunControl2V", "WAN21_Camera", "WAN22_Camera",
                   "WAN21_Vace", "WAN21_HuMo", "WAN22_S2V", "WAN22_Animate", "WAN22_T2V"),
           "wan", "wan", None, "wan2"),
    Family("HiDream", ("HiDream",), "hidream", "hidream", None, "hidream"),
    Family("LTX-Video", ("LTXV",), "ltxv", ("ltxv", "ltx-video", "ltx_video"), None, "ltx-video"),
    Family("HunyuanVideo 1.5", ("HunyuanVideo15", "HunyuanVideo15_SR_Distilled"), "hunyuanvideo15",
           ("hunyuanvideo15", "hunyuan_video_1_5", "hunyuan-video-1.5"), None, "hunyuan-video-1.5"),
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


def accepts(model_label: str, lora_labels: tuple[str, ...]) -> bool:
    """Whether a model of family ``model_label`` runs a LoRA that may be of any of ``lora_labels``
    (one label, or the families its keys cannot tell apart): one of them is the model's own family
    or one the model's family takes."""
    row = by_label(model_label)
    return model_label in lora_labels or (row is not None and any(lab in row.takes for lab in lora_labels))


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
