"""Captioning of image folders (WD14-style tags or vision-language sentences) and image preparation for LoRA
data sets.

Public API: caption_folder (with CaptionOptions, RunOptions, CaptionReport), get_tagger / Tagger,
find_taggers, caption_folder_vlm (with SentenceOptions, TagHints), load_captioner, find_captioners,
prepare_images (with PrepareOptions, PrepareReport), load_image, tagger_input.
onnxruntime is imported only when a tagger is first loaded, transformers when a captioner is.
"""

from .captioning import CaptionReport, RunOptions, caption_folder
from .captions import CaptionOptions, build_caption, parse_replacements, parse_tag_list
from .image_files import ImageLoadError, load_image, scan_folder
from .prepare import PrepareOptions, PrepareReport, prepare_buckets, prepare_images
from .preprocess import tagger_input, to_rgb
from .tagger import (
    Tagger,
    TaggerError,
    TaggerFiles,
    clear_tagger_cache,
    find_taggers,
    get_tagger,
    load_tag_list,
)
from .vlm import VlmCaptioner, load_captioner
from .vlm_files import CaptionerError, find_captioners, inspect_captioner
from .vlm_run import TagHints, caption_folder_vlm
from .vlm_text import SentenceOptions

__all__ = [
    "CaptionOptions", "CaptionReport", "ImageLoadError", "PrepareOptions", "PrepareReport", "RunOptions",
    "Tagger", "TaggerError", "TaggerFiles", "build_caption", "caption_folder", "clear_tagger_cache",
    "find_taggers", "get_tagger", "load_image", "load_tag_list", "prepare_buckets", "parse_replacements",
    "parse_tag_list", "prepare_images", "scan_folder", "tagger_input", "to_rgb",
    "CaptionerError", "SentenceOptions", "TagHints", "VlmCaptioner", "caption_folder_vlm", "find_captioners",
    "inspect_captioner", "load_captioner",
]  # fmt: skip
