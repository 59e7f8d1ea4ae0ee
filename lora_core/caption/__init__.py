"""WD14-style captioning of image folders and image preparation for LoRA data sets.

Public API: caption_folder (with CaptionOptions, RunOptions, CaptionReport), get_tagger / Tagger,
find_taggers, prepare_images (with PrepareOptions, PrepareReport), load_image, tagger_input.
onnxruntime is imported only when a tagger is first loaded.
"""

from .captioning import CaptionReport, RunOptions, caption_folder
from .captions import CaptionOptions, build_caption, parse_replacements, parse_tag_list
from .image_files import ImageLoadError, load_image, scan_folder
from .prepare import PrepareOptions, PrepareReport, make_buckets, prepare_images
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

__all__ = [
    "CaptionOptions", "CaptionReport", "ImageLoadError", "PrepareOptions", "PrepareReport", "RunOptions",
    "Tagger", "TaggerError", "TaggerFiles", "build_caption", "caption_folder", "clear_tagger_cache",
    "find_taggers", "get_tagger", "load_image", "load_tag_list", "make_buckets", "parse_replacements",
    "parse_tag_list", "prepare_images", "scan_folder", "tagger_input", "to_rgb",
]  # fmt: skip
