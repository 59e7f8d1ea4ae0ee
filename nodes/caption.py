"""Caption Dataset node: captions an image folder with a WD14-style tagger (tags) or a vision-language model
(sentences, see caption_vlm.py)."""

from __future__ import annotations

from pathlib import Path

from ..lora_core.caption import (
    CaptionOptions,
    ImageLoadError,
    RunOptions,
    TaggerError,
    caption_folder,
    find_taggers,
    parse_replacements,
    parse_tag_list,
)
from ..lora_core.caption.vlm_files import CaptionerError
from . import comfy_bridge as bridge
from .caption_vlm import TAGGER_CHOICE, run_vlm, sentence_options, vlm_inputs
from .dataset_inputs import CATEGORY, FOLDER_TIP, WRITE_TIP, confined_folder

NO_TAGGER = "(no tagger installed: see models/taggers)"
THRESHOLD = {"min": 0.0, "max": 1.0, "step": 0.01}
CAPTION_NODE = "Caption Dataset"


def _tagger_folders() -> list[Path]:
    return [Path(p) for p in bridge.tagger_folders()]


def tagger_names() -> list[str]:
    found, _ = find_taggers(_tagger_folders())
    return [t.name for t in found] or [NO_TAGGER]


def _tagger_files(name: str):
    found, problems = find_taggers(_tagger_folders())
    for tagger in found:
        if tagger.name == name:
            return tagger
    where = " or ".join(str(f) for f in _tagger_folders())
    hint = f" ({'; '.join(problems)})" if problems else ""
    raise FileNotFoundError(
        f"tagger '{name}' is not installed{hint}. Put a WD14 tagger in {where}: either "
        "<name>/model.onnx with <name>/selected_tags.csv (as SmilingWolf publishes them), or <name>.onnx "
        "with <name>.csv; then refresh the node list (press R)"
    )


def _previews(report):
    import numpy as np
    import torch

    if not report.previews:
        return torch.zeros((1, 64, 64, 3), dtype=torch.float32)
    return torch.from_numpy(np.stack(report.previews)).float() / 255.0  # (B, H, W, 3) in 0..1


class CaptionDataset:
    DESCRIPTION = (
        "Captions every image in a folder and writes training captions (<image name>.txt): tags from a WD14-style "
        "ONNX tagger, or sentences from a vision-language model (captioner: Qwen2.5-VL, Qwen3-VL, Florence-2, "
        "JoyCaption) for DiT families that read natural language. Bad files are reported and skipped; existing captions are kept unless you choose "
        "overwrite or append."
    )
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("captions", "summary", "previews", "folder")
    OUTPUT_TOOLTIPS = (
        "One line per tagged image: 'file: caption'.",
        "Counts of tagged, skipped and failed images with reasons, and a tag-frequency table.",
        "Small square thumbnails of the tagged images.",
        "The captioned image folder (absolute), available once the captions are written: connect it to "
        "LoRA Training Dataset's folder so training runs after captioning.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {"default": "dataset", "tooltip": FOLDER_TIP + " Captions are written beside the images (so it must be one nodes may write: input, output or the owner's folders) unless output_folder is set."}),
                "tagger": (tagger_names(), {"tooltip": "A WD14 tagger from models/taggers (<name>/model.onnx + selected_tags.csv)."}),
                "general_threshold": ("FLOAT", {"default": 0.35, **THRESHOLD, "tooltip": "General tags scoring above this are kept. Lower: more tags."}),
                "character_threshold": ("FLOAT", {"default": 0.85, **THRESHOLD, "tooltip": "Character tags scoring above this are kept."}),
                "trigger_word": ("STRING", {"default": "", "tooltip": "Your LoRA's activation word: written first in every caption (with a captioner's training (trigger woven in) preset, used inside the sentence instead). Empty: none."}),
                "mode": (["skip", "overwrite", "append"], {"default": "skip", "tooltip": "Images that already have a caption: skip them, overwrite the caption, or append new tags to it without duplicates."}),
            },
            "optional": {
                "always_first": ("STRING", {"default": "", "tooltip": "Comma-separated tags moved to the front when the tagger finds them (e.g. 1girl, 1boy)."}),
                "exclude_tags": ("STRING", {"default": "", "multiline": True, "tooltip": "Comma-separated tags never written (e.g. features every image shares). For sentences: these words or phrases are removed."}),
                "tag_replacements": ("STRING", {"default": "", "multiline": True, "tooltip": "'old -> new' pairs, comma or line separated; 'old ->' removes the tag. For sentences: whole words or phrases, any case."}),
                "replace_underscores": ("BOOLEAN", {"default": True, "tooltip": "long_hair -> long hair (kaomoji such as ^_^ are kept)."}),
                "escape_brackets": ("BOOLEAN", {"default": True, "tooltip": "Write ( ) as \\( \\) so prompts do not read them as weights."}),
                "max_tags": ("INT", {"default": 0, "min": 0, "max": 500, "tooltip": "Keep at most this many tagger tags (highest scores first); 0: no limit."}),
                "output_folder": ("STRING", {"default": "", "tooltip": "Write captions here instead of beside the images (same relative layout). Empty: beside the images. " + WRITE_TIP}),
                "include_subfolders": ("BOOLEAN", {"default": False, "tooltip": "Also caption images in subfolders."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "Images per model call. Larger helps on GPU; on CPU 1-4 is as fast for the tagger, while a vision-language captioner gains from 8-16."}),
                **vlm_inputs(),
            },
        }  # fmt: skip

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # the folder's contents can change between runs with the same inputs

    def execute(self, folder, tagger, general_threshold, character_threshold, trigger_word, mode, always_first="",
                exclude_tags="", tag_replacements="", replace_underscores=True, escape_brackets=True, max_tags=0,
                output_folder="", include_subfolders=False, batch_size=4, captioner=TAGGER_CHOICE, **vlm):  # fmt: skip
        try:
            options = CaptionOptions(
                general_threshold, character_threshold, trigger_word.strip(), parse_tag_list(always_first),
                parse_tag_list(exclude_tags), parse_replacements(tag_replacements), replace_underscores,
                escape_brackets, max_tags,
            )  # fmt: skip
            out = None
            if output_folder.strip():
                out = confined_folder(output_folder, "output_folder", write=True, must_exist=False)
            run = RunOptions(mode=mode, output_dir=out, recursive=include_subfolders, batch_size=batch_size)
            # captions are written beside the images unless an output folder is given
            source = confined_folder(folder, "folder", write=out is None)
            if captioner == TAGGER_CHOICE:
                model = _tagger_files(tagger).model
                on_progress, should_stop = bridge.progress_callbacks()
                report = caption_folder(source, model, options, run, on_progress, should_stop)
            else:
                sentences = sentence_options(vlm, options.trigger_word, options.exclude, options.replacements)
                hints = _tagger_files(tagger).model if sentences.tag_hints else None
                report = run_vlm(source, captioner, sentences, run, hints, options)
        except (TaggerError, CaptionerError, ImageLoadError, OSError, ValueError) as e:
            raise RuntimeError(f"[{CAPTION_NODE}] {e}") from e
        summary = report.summary()
        previews = _previews(report)
        result = (report.captions_text(), summary, previews, str(source))
        ui = {"text": [summary], "captions": report.captions_text().splitlines()[:64]}
        if report.previews:
            ui["images"] = bridge.preview_images(previews, "lora_foundry_captions")
        return {"ui": ui, "result": result}
