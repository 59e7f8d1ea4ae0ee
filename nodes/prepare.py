"""Prepare Images node: crops or resizes an image folder to training buckets into a new folder."""

from __future__ import annotations

from ..lora_core.budget import check_fits, image_need
from ..lora_core.caption import PrepareOptions, prepare_images
from . import comfy_bridge as bridge
from .dataset_inputs import CATEGORY, FOLDER_TIP, WRITE_TIP, confined_folder

PREPARE_NODE = "Prepare Images"


class PrepareImages:
    DESCRIPTION = (
        "Crops or resizes a folder of images to aspect-ratio buckets or a fixed size, applies EXIF rotation and "
        "converts to RGB, writing into a new folder. The originals are never changed, and no file already in the "
        "output folder is replaced."
    )
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("output_folder", "summary")
    OUTPUT_TOOLTIPS = (
        "Absolute path of the prepared folder (connect it to Caption Dataset's folder).",
        "What was written and skipped.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "source_folder": ("STRING", {"default": "dataset", "tooltip": "Images to prepare. Never modified. " + FOLDER_TIP}),
                "output_folder": ("STRING", {"default": "dataset_prepared", "tooltip": "A new folder for the results; files already there are kept, never replaced. Must not be the source folder. " + WRITE_TIP}),
                "target": (["buckets", "fixed"], {"default": "buckets", "tooltip": "buckets: the aspect-ratio bucket nearest each image (area resolution x resolution, sides multiples of 64). fixed: width x height."}),
                "resolution": ("INT", {"default": 1024, "min": 256, "max": 4096, "step": 64, "tooltip": "Bucket resolution (512 for SD1.5, 1024 for SDXL)."}),
                "width": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8, "tooltip": "Width for target 'fixed'."}),
                "height": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8, "tooltip": "Height for target 'fixed'."}),
                "fit": (["crop", "resize"], {"default": "crop", "tooltip": "crop: fill the target exactly and cut the overflow (centred). resize: fit inside, keep everything and the aspect ratio."}),
            },
            "optional": {
                "output_format": (["png", "jpg", "webp"], {"default": "png", "tooltip": "png is lossless; jpg and webp are written at quality 95."}),
                "allow_upscale": ("BOOLEAN", {"default": True, "tooltip": "Off: images smaller than their target are skipped instead of enlarged."}),
                "include_subfolders": ("BOOLEAN", {"default": False, "tooltip": "Also prepare subfolders, keeping their layout."}),
                "copy_captions": ("BOOLEAN", {"default": True, "tooltip": "Copy each image's existing .txt caption next to the prepared image (an existing .txt there is kept; captions over 64 KB are cut, with a note)."}),
            },
        }  # fmt: skip

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def execute(self, source_folder, output_folder, target, resolution, width, height, fit, output_format="png",
                allow_upscale=True, include_subfolders=False, copy_captions=True):  # fmt: skip
        try:
            options = PrepareOptions(target=target, resolution=resolution, width=width, height=height, fit=fit,
                                     allow_upscale=allow_upscale, output_format=output_format,
                                     recursive=include_subfolders, copy_captions=copy_captions)  # fmt: skip
            # Buckets have an area of at most resolution x resolution; a fixed target is width x height.
            size = (width, height) if target == "fixed" else (resolution, resolution)
            check_fits(
                image_need(*size), bridge.available_memory("cpu"), "the CPU (images are prepared in RAM)"
            )
            source = confined_folder(source_folder, "source_folder")
            out = confined_folder(output_folder, "output_folder", write=True, must_exist=False)
            on_progress, should_stop = bridge.progress_callbacks()
            report = prepare_images(source, out, options, on_progress, should_stop)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"[{PREPARE_NODE}] {e}") from e
        summary = report.summary()
        return {"ui": {"text": [summary]}, "result": (str(report.output), summary)}
