"""Caption Dataset's vision-language path: the captioner list, its widgets, and one run (load, caption, unload)."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

from ..lora_core.caption.captioning import CaptionReport, RunOptions
from ..lora_core.caption.captions import CaptionOptions
from ..lora_core.caption.tagger import get_tagger
from ..lora_core.caption.vlm import load_captioner
from ..lora_core.caption.vlm_files import CaptionerError, CaptionerFolder, find_captioners
from ..lora_core.caption.vlm_run import TagHints, caption_folder_vlm
from ..lora_core.caption.vlm_text import PRESETS, SentenceOptions
from . import comfy_bridge as bridge
from . import comfy_bridge_caption as vlm_bridge

TAGGER_CHOICE = "WD14 tagger (tags)"

# Appended after the tagger's widgets so graphs saved before them keep every value in its place.
VLM_INPUTS = {
    "captioner": None,  # filled in by vlm_inputs(): the list changes as folders are added
    "prompt_preset": (list(PRESETS), {"default": "detailed", "tooltip": "What the captioner is asked for. training (trigger woven in): the trigger word used inside the sentence; training (trigger first): put before it. custom: your own instruction (custom_prompt)."}),
    "custom_prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "The instruction for prompt_preset 'custom'. {trigger} and {tags} are replaced by the trigger word and the tagger's tags."}),
    "max_new_tokens": ("INT", {"default": 160, "min": 8, "max": 1024, "tooltip": "Longest answer in tokens (about 0.75 words each). A sentence cut by this limit is dropped from the caption."}),
    "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "0: greedy, the same caption on every run. Higher: more varied wording (seeded, so a run repeats)."}),
    "tag_hints": ("BOOLEAN", {"default": False, "tooltip": "Run the selected WD14 tagger first and give its tags to the captioner as hints ('These tags describe the image: ...'); thresholds, excludes and replacements apply to them."}),
    "strip_preamble": ("BOOLEAN", {"default": True, "tooltip": "Remove openings such as 'The image shows' and 'In this picture,'."}),
}  # fmt: skip


def _roots() -> list[Path]:
    return [Path(p) for p in vlm_bridge.captioner_folders()]


def captioner_choices() -> list[str]:
    found, _ = find_captioners(_roots())
    return [TAGGER_CHOICE] + [c.name for c in found]


def vlm_inputs() -> dict:
    inputs = dict(VLM_INPUTS)
    inputs["captioner"] = (captioner_choices(), {"default": TAGGER_CHOICE, "tooltip": "Tags from the WD14 tagger, or sentences from a vision-language model in models/captioners/<name>/ (a transformers folder with safetensors weights: Qwen2.5-VL, Qwen3-VL, Florence-2, JoyCaption / LLaVA)."})  # fmt: skip
    return inputs


def captioner_folder(name: str) -> CaptionerFolder:
    found, problems = find_captioners(_roots())
    for captioner in found:
        if captioner.name == name:
            return captioner
    for problem in problems:
        if f"/{name}" in problem or f"\\{name}" in problem:
            raise CaptionerError(problem)
    where = " or ".join(str(r) for r in _roots())
    raise CaptionerError(
        f"captioner '{name}' is not installed: put its transformers folder (config.json, *.safetensors, tokenizer "
        f"and processor files) in {where}/<name>/, then refresh the node list (press R)"
    )


def sentence_options(kw: dict, trigger_word: str, exclude: tuple, replacements: tuple) -> SentenceOptions:
    return SentenceOptions(
        preset=kw.get("prompt_preset", "detailed"), custom_prompt=kw.get("custom_prompt", ""),
        trigger_word=trigger_word, exclude=exclude, replacements=replacements,
        strip_preamble=kw.get("strip_preamble", True), max_new_tokens=kw.get("max_new_tokens", 160),
        temperature=kw.get("temperature", 0.0), tag_hints=kw.get("tag_hints", False),
    )  # fmt: skip


def run_vlm(
    source: Path, name: str, options: SentenceOptions, run: RunOptions, tagger_model: Path | None,
    tag_options: CaptionOptions,
) -> CaptionReport:  # fmt: skip
    """One run: the captioner loaded onto the device ComfyUI chose, the folder captioned, the model released."""
    files = captioner_folder(name)
    hints = TagHints(get_tagger(tagger_model), tag_options) if options.tag_hints and tagger_model else None
    place = vlm_bridge.placement(str(files.path))
    captioner = load_captioner(files, place.dtype)
    on_progress, should_stop = bridge.progress_callbacks()
    try:
        with vlm_bridge.on_device(captioner.model, place.device):
            report = caption_folder_vlm(source, captioner, options, run, hints, on_progress, should_stop)
    finally:
        del captioner
        gc.collect()
    if place.note:
        report = dataclasses.replace(report, notes=(*report.notes, place.note))
    return report
