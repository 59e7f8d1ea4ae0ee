"""What the dataset nodes share: their menu category, folder tooltips, and reading a folder typed into the graph."""

from __future__ import annotations

from pathlib import Path

from ..lora_core.files.confine import resolve_folder
from . import comfy_bridge as bridge

CATEGORY = "LoRA Foundry/dataset"
FOLDER_TIP = (
    "A folder inside ComfyUI's input folder (relative names start there); absolute paths work inside "
    "input, output, the models folders or a folder the server's owner allowed (allowed_folders.txt)."
)
WRITE_TIP = (
    "Inside ComfyUI's input folder (relative names start there) or output folder, or a folder the "
    "server's owner allowed; models folders are read only."
)


def confined_folder(text: str, field: str, write: bool = False, must_exist: bool = True) -> Path:
    """The real path of a folder typed into the graph, confined to the folders this server allows
    (lora_core.files.confine: input, output, models read only, and the owner's); relative ones start in input."""
    return resolve_folder(text, bridge.confinement_roots(), field, write=write, must_exist=must_exist)
