"""Merge LoRAs (a stack into one new LoRA file) and Resize LoRA (lower a file's rank)."""

from __future__ import annotations

import os

from ..lora_core.apply.keymap import kohya_names
from ..lora_core.apply.stack import read_stack
from ..lora_core.budget import MemoryBudgetError
from ..lora_core.files.savefile import safe_output_name
from ..lora_core.merge.bake import bake_stack
from ..lora_core.merge.merge import METHODS, MergeSpec
from ..lora_core.merge.resize import RESIZE_MODES
from ..lora_core.merge.resize_file import resize_file
from . import comfy_bridge as bridge
from .load_lora import check_block_weights
from .lora_apply import plan_entries

CATEGORY = "LoRA Foundry"
DTYPES = ["fp16", "bf16", "fp32"]
METHOD_TIP = (
    "concat: exact, rank = sum of ranks. svd: best approximation at the target rank (exact when the "
    "rank covers the sum). linear: average of factors (equal ranks only, approximate). ties / dare_*: "
    "task-arithmetic merges with pruning (density, seed), re-factored to the target rank."
)


USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, MemoryBudgetError)


class WrittenFiles:
    """The output files this process's Merge / Resize nodes wrote, so a re-queued node runs again
    when its file is gone.

    ComfyUI reuses a node's cached result while its inputs are unchanged, even after the file it
    wrote was deleted. IS_CHANGED returns a generation number per output path that moves on only
    when the file this process wrote there is no longer there (deleted, or replaced by another
    file): the value is the same before the first run and after it, so a re-queued identical
    node with its file in place stays cached (and does not fail on "exists").
    """

    def __init__(self):
        self.written: dict[str, tuple[int, int, int]] = {}  # path -> (inode, size, mtime_ns)
        self.generation: dict[str, int] = {}

    @staticmethod
    def identity(path: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def state(self, path: str) -> str:
        if path in self.written and self.identity(path) != self.written[path]:
            del self.written[path]
            self.generation[path] = self.generation.get(path, 0) + 1
        return f"{path}#{self.generation.get(path, 0)}"

    def record(self, path: str) -> None:
        self.written[path] = self.identity(path)


WRITTEN = WrittenFiles()


def _output_state(output_name: str) -> str:
    try:
        path = os.path.join(bridge.loras_dir(), safe_output_name(output_name))
    except (ValueError, TypeError, AttributeError):
        return "invalid name"  # execute raises the clear error
    return WRITTEN.state(os.path.abspath(path))


def _output_inputs() -> dict:
    return {
        "save_dtype": (DTYPES, {"default": "fp16", "tooltip": "Precision of the tensors in the new file."}),
        "output_name": ("STRING", {"default": "merged_lora", "tooltip": "File name in models/loras (no folders; .safetensors is added)."}),
        "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name. Off: an existing file is an error."}),
    }  # fmt: skip


class MergeLoras:
    DESCRIPTION = "Merges a LoRA stack into one new kohya LoRA file in models/loras, with ss_* metadata."
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("lora_name", "report")
    OUTPUT_TOOLTIPS = (
        "Name of the new file in models/loras.",
        "Method, rank, and the error against the stack.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the LoRAs are for: it names the layers in the new file."}),
                "lora_stack": ("LORA_STACK", {"tooltip": "The LoRAs to merge; their strengths are the merge weights."}),
                "method": (list(METHODS), {"default": "svd", "tooltip": METHOD_TIP}),
                "rank": ("INT", {"default": 32, "min": 1, "max": 1024, "tooltip": "Target rank for svd, ties and dare (ignored by concat and linear)."}),
                "conv_rank": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "Rank for 3x3 convolutions; 0 uses rank."}),
                "density": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "Fraction of values kept by ties and dare."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of dare's random pruning."}),
                **_output_inputs(),
            },
            "optional": {"clip": ("CLIP", {"tooltip": "The text encoder; connect it to merge the LoRAs' text-encoder layers too."})},
        }  # fmt: skip

    @classmethod
    def IS_CHANGED(cls, output_name="", **_):
        return _output_state(output_name)

    def execute(self, model, lora_stack, method, rank, conv_rank, density, seed, save_dtype, output_name,
                overwrite, clip=None):  # fmt: skip
        node = "Merge LoRAs"
        try:
            entries = read_stack(lora_stack)
            safe_output_name(output_name)  # a bad name fails before any file is read
        except ValueError as e:
            raise RuntimeError(f"[{node}] {e}") from e
        if not entries:
            raise RuntimeError(f"[{node}] the stack has no enabled entry: nothing to merge")
        check_block_weights(node, model, entries)
        sp = plan_entries(node, model, clip, entries)
        names = {part: kohya_names(km, bridge.sgm_unet(model)) for part, km in sp.key_maps.items()}
        try:
            spec = MergeSpec(method, rank, conv_rank or None, density, seed)
            n_modules = len({t for p in sp.plans for part in p.patches.values() for t in part})
            result = bake_stack(sp.loras, sp.plans, names, sp.shapes, bridge.loras_dir(), output_name, spec,
                                sp.family.family, save_dtype, overwrite, bridge.progress(n_modules),
                                bridge.available_memory("cpu"))  # fmt: skip
        except USER_ERRORS as e:
            raise RuntimeError(f"[{node}] {e}") from e
        WRITTEN.record(os.path.abspath(result.path))
        name = bridge.register_new_lora(result.path)
        report = result.text(method)
        return {"ui": {"text": [report], bridge.LORA_WRITTEN: [name]}, "result": (name, report)}


class ResizeLora:
    DESCRIPTION = (
        "Lowers the rank of a LoRA file (fixed rank, or by singular values / energy kept) into a new file."
    )
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("lora_name", "report")
    OUTPUT_TOOLTIPS = ("Name of the new file in models/loras.", "Ranks and Frobenius energy kept per module.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (bridge.lora_names(), {"tooltip": "A kohya-style LoRA file from models/loras."}),
                "mode": (list(RESIZE_MODES), {"default": "fixed", "tooltip": "fixed: the rank below. sv_ratio: keep singular values >= value x the largest. energy: keep this fraction of the Frobenius energy."}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip": "New rank for mode 'fixed'."}),
                "value": ("FLOAT", {"default": 0.9, "min": 0.001, "max": 1.0, "step": 0.001, "tooltip": "The fraction for modes sv_ratio and energy."}),
                **_output_inputs(),
            }
        }  # fmt: skip

    @classmethod
    def IS_CHANGED(cls, output_name="", **_):
        return _output_state(output_name)

    def execute(self, lora_name, mode, rank, value, save_dtype, output_name, overwrite):
        try:
            result = resize_file(bridge.lora_path(lora_name), bridge.loras_dir(), output_name, mode,
                                 rank if mode == "fixed" else value, save_dtype, overwrite,
                                 bridge.available_memory("cpu"))  # fmt: skip
        except USER_ERRORS as e:
            raise RuntimeError(f"[Resize LoRA] {e}") from e
        WRITTEN.record(os.path.abspath(result.path))
        name = bridge.register_new_lora(result.path)
        return {"ui": {"text": [result.text()], bridge.LORA_WRITTEN: [name]}, "result": (name, result.text())}
