"""Naming the trainer and key layout a LoRA file was written in, and the model family, for the report.

The layout is read from the module names' spelling (what each trainer's save function writes: see
docs/load_lora.md) and sharpened by the header when the trainer signs it (kohya's and musubi-tuner's
``ss_network_module``, ai-toolkit's ``software``). It only labels: loading never depends on it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

# Spelling of a module name -> (layout, the trainers known to write it).
_PREFIXES = (
    ("lora_unet_", "lora_unet_ names", "kohya-style (sd-scripts / musubi-tuner)"),
    ("lora_transformer_", "lora_transformer_ names", "OneTrainer"),
    ("lycoris_", "lycoris_ names", "SimpleTuner LyCORIS"),
    ("diffusion_model.", "diffusion_model. names", "ai-toolkit / ComfyUI-style"),
    ("transformer.", "transformer. PEFT names", "diffusers / SimpleTuner / ai-toolkit"),
    ("base_model.model.", "PEFT names", "PEFT"),
    ("lora_te", "lora_te names", "kohya-style"),
    ("text_encoder", "text_encoder. names", "diffusers"),
)
_BARE = ("bare module paths", "DiffSynth-Studio")
# musubi-tuner's network modules (networks/lora_<arch>.py); sd-scripts has lora_flux, lora_sd3, lora_lumina.
_MUSUBI_NETWORKS = ("lora_wan", "lora_qwen_image", "lora_zimage", "lora_flux_2", "lora_hv_1_5", "lora_framepack",
                    "lora_kandinsky", "lora_hidream", "lora_ltx")  # fmt: skip
# Header text that names the trainer, looked for in these keys' values (short ones only).
_SIGNATURES = (("ai-toolkit", "ai-toolkit"), ("ai_toolkit", "ai-toolkit"), ("simpletuner", "SimpleTuner"),
               ("onetrainer", "OneTrainer"), ("diffsynth", "DiffSynth-Studio"), ("musubi", "musubi-tuner"))  # fmt: skip
_SIGNED_KEYS = ("software", "ss_network_module", "modelspec.implementation", "training_info", "format")
_MAX_SIGNED_CHARS = 4096

# ComfyUI's model class names (comfy.supported_models) -> the family's name users know.
_FAMILY_NAMES = {
    "ZImage": "Z-Image", "Lumina2": "Lumina 2", "QwenImage": "Qwen-Image", "Chroma": "Chroma",
    "ChromaRadiance": "Chroma Radiance", "Flux2": "Flux.2", "HiDream": "HiDream", "LTXV": "LTX-Video",
    "LTXAV": "LTX-2", "HunyuanVideo15": "HunyuanVideo 1.5", "HunyuanVideo": "HunyuanVideo",
    "HunyuanImage21": "HunyuanImage 2.1", "SD3": "SD3", "Flux": "Flux", "FluxSchnell": "Flux",
    "FluxInpaint": "Flux",
}  # fmt: skip


def family_name(model_class: str, fallback: str = "") -> str:
    """The family's name for a ComfyUI model class ("WAN22_T2V" -> "Wan 2.2"), else ``fallback``."""
    if model_class.startswith("WAN2"):
        return f"Wan 2.{model_class[4]}" if model_class[4:5].isdigit() else "Wan"
    return _FAMILY_NAMES.get(model_class, fallback)


def _spelling(name: str) -> tuple[str, str]:
    for prefix, layout, trainer in _PREFIXES:
        if name.startswith(prefix):
            return layout, trainer
    return _BARE


def _signed_by(metadata: Mapping[str, str]) -> str | None:
    module = str(metadata.get("ss_network_module", ""))
    if module.rsplit(".", 1)[-1] in _MUSUBI_NETWORKS:
        return "musubi-tuner"
    for key in _SIGNED_KEYS:
        text = str(metadata.get(key, ""))
        if len(text) > _MAX_SIGNED_CHARS:
            continue
        text = text.lower()
        for needle, trainer in _SIGNATURES:
            if needle in text:
                return trainer
    if module.startswith("networks.lora"):
        return "kohya sd-scripts"
    return None


def layout_label(modules: Iterable[str], metadata: Mapping[str, str], family: str = "") -> str:
    """'musubi-tuner Wan 2.1 LoRA (lora_unet_ names)': trainer, family, the names' spelling."""
    counts = Counter(_spelling(name) for name in modules)
    if not counts:
        return ""
    (layout, trainer), _ = counts.most_common(1)[0]
    signed = _signed_by(metadata)
    who = signed or trainer
    what = f"{family} LoRA" if family else "LoRA"
    mixed = (
        f"; also {', '.join(sorted(lay for (lay, _), _n in counts.items() if lay != layout))}"
        if len(counts) > 1
        else ""
    )
    return f"{who} {what} ({layout}{mixed})"
