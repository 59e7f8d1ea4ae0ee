"""Vision-language captioner folders: which family a folder holds (config.json model_type), whether it has
everything a run needs, and which folders are installed. Nothing here imports transformers or reads weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CONFIG_LIMIT = 4 << 20  # bytes of config.json read; real ones are a few KB
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class CaptionerError(Exception):
    """A captioner folder or model that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Family:
    """One model family: how transformers names its class, the version that added it, how it is prompted."""

    model_type: str  # config.json "model_type"
    label: str
    model_class: str  # attribute of the transformers module
    min_transformers: str
    decoder_only: bool = True  # pad on the left so every row's answer starts at the same column
    task_tokens: bool = False  # Florence-2: prompted with task tokens, not free text


FAMILIES = {
    f.model_type: f
    for f in (
        Family("qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", "4.45.0"),
        Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "4.49.0"),
        Family("qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", "4.57.0"),
        Family("llava", "LLaVA / JoyCaption", "LlavaForConditionalGeneration", "4.45.0"),
        Family("florence2", "Florence-2", "Florence2ForConditionalGeneration", "4.56.0", False, True),
    )
}


@dataclass(frozen=True)
class CaptionerFolder:
    """An installed captioner: the name shown in a list, its folder, its family and the weight files."""

    name: str
    path: Path
    family: Family
    weights: tuple[Path, ...]


def read_config(folder: Path) -> dict:
    """config.json of a captioner folder as a dict, read as an untrusted file (capped, JSON only)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CaptionerError(
            f"{folder} has no config.json: a captioner folder is a transformers save_pretrained folder "
            "(config.json, *.safetensors, tokenizer and processor files), e.g. a full download of the model's repo"
        )
    with open(path, "rb") as handle:
        raw = handle.read(CONFIG_LIMIT + 1)
    if len(raw) > CONFIG_LIMIT:
        raise CaptionerError(f"{path} is larger than {CONFIG_LIMIT >> 20} MB: not a model config")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CaptionerError(f"{path} is not valid JSON ({error}); download the folder again") from error
    if not isinstance(config, dict):
        raise CaptionerError(f"{path} should hold a JSON object, got {type(config).__name__}")
    return config


def family_of(folder: Path, config: dict) -> Family:
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        known = ", ".join(f"{f.label} ({f.model_type})" for f in FAMILIES.values())
        raise CaptionerError(
            f"{folder / 'config.json'} has model_type {model_type!r}, which is not a captioner family this pack "
            f"runs; supported: {known}"
        )
    if family.model_type == "florence2" and "auto_map" in config:
        raise CaptionerError(
            f"{folder} holds the remote-code Florence-2 (its config.json has auto_map), which needs code from the "
            "download to run; this pack never runs downloaded code: use the transformers-native conversion "
            "(e.g. florence-community/Florence-2-large)"
        )
    return family


def weight_files(folder: Path) -> tuple[Path, ...]:
    """The safetensors weights of a folder; a folder with only pickle weights is refused by name."""
    folder = Path(folder)
    safetensors = tuple(sorted(p for p in folder.glob("*.safetensors") if p.is_file()))
    if safetensors:
        return safetensors
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CaptionerError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:4])}): they are never loaded, since unpickling "
            "can run code from the file. Download the model's .safetensors weights instead"
        )
    raise CaptionerError(f"{folder} has no weights: put the model's *.safetensors files in it")


def check_processor_files(folder: Path) -> None:
    """The tokenizer and image processor a run needs are present (named when missing)."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise CaptionerError(
            f"{folder} has no image processor file ({' or '.join(PROCESSOR_FILES)}): download it with the model"
        )
    if not (folder / "tokenizer_config.json").is_file():
        raise CaptionerError(f"{folder} has no tokenizer_config.json: download it with the model")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CaptionerError(
            f"{folder} has no tokenizer vocabulary ({' or '.join(TOKENIZER_FILES)}): download it with the model"
        )


def inspect_captioner(folder: Path, name: str | None = None) -> CaptionerFolder:
    """Everything about a folder that can be checked without loading it; raises CaptionerError naming the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptionerError(f"captioner folder {folder} does not exist")
    family = family_of(folder, read_config(folder))
    weights = weight_files(folder)
    check_processor_files(folder)
    return CaptionerFolder(name or folder.name, folder, family, weights)


def find_captioners(folders: list[Path]) -> tuple[list[CaptionerFolder], list[str]]:
    """Captioner folders (`<root>/<name>/config.json`) under each root; problems name the folders that are
    not usable and why, so the node can say so instead of listing them."""
    found: list[CaptionerFolder] = []
    problems: list[str] = []
    for root in folders:
        root = Path(root)
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                found.append(inspect_captioner(folder))
            except (CaptionerError, OSError) as error:
                problems.append(str(error))
    return found, problems
