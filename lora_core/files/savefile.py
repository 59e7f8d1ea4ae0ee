"""Writing LoRA files: kohya key names, ss_* metadata, output names checked, atomic writes.

Keys written per module: `<name>.lora_up.weight`, `<name>.lora_down.weight` and `<name>.alpha`
(0-dim). The file appears complete or not at all and never clobbers a file unless asked
(lora_core.files.atomic, the pack's one writer: temp in the same folder, fsync, link or replace).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch

from ..adapters import LoraAdapter
from .atomic import NAME_MAX, TEMP_OVERHEAD, exists_error, write_with

SUFFIX = ".safetensors"
DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """'fp16' / 'bf16' / 'fp32' (or the torch dtype itself) -> torch dtype."""
    resolved = DTYPES.get(dtype.lower()) if isinstance(dtype, str) else dtype
    if resolved not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of fp16, bf16, fp32; got {dtype!r}")
    return resolved  # type: ignore[return-value]


_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _bad_char(text: str) -> str | None:
    """The first character a file name must not hold: controls (newline, tab, NUL...), line and
    paragraph separators, and the bidi controls that make a name read differently than it is."""
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in _BIDI:
            return ch
    return None


def _shown(name: str, limit: int = 80) -> str:
    # A name pasted from anywhere can be megabytes long: the message quotes its start.
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name)} characters)"


def _check_length(stem: str, longest_suffix: str) -> None:
    size = len(stem.encode("utf-8"))
    room = NAME_MAX - len(longest_suffix.encode("utf-8")) - TEMP_OVERHEAD
    if size > room:
        raise ValueError(
            f"`output_name` is {size} bytes long (UTF-8); it can be at most {room} bytes here: file names "
            f"are limited to {NAME_MAX} bytes, and the ending '{longest_suffix}' and the temp name used while "
            "saving take the rest. Shorten the name"
        )


def safe_output_name(name: str, longest_suffix: str = SUFFIX) -> str:
    """A bare file name for the loras folder, with `.safetensors` added when missing.

    ``longest_suffix`` is the longest ending the caller puts after the name's stem (a training
    run writes '<name>-step0000001000.trainstate.json'): every file written must fit NAME_MAX
    bytes together with its temp name.
    """
    stripped = name.strip()
    if not stripped or stripped in (".", ".."):
        raise ValueError(f"`output_name` {_shown(name)} is empty: give a file name such as 'my_merge'")
    if "/" in stripped or "\\" in stripped or ".." in stripped or ":" in stripped:
        raise ValueError(
            f"`output_name` {_shown(name)} contains a path separator, ':' or '..': give a plain file name "
            "such as 'my_merge'; it is saved in the loras folder"
        )
    bad = _bad_char(stripped)
    if bad is not None:
        raise ValueError(
            f"`output_name` {_shown(name)} contains the control character U+{ord(bad):04X}: file names may not "
            "hold newlines, tabs or other control characters; type the name on one line"
        )
    if stripped.startswith("."):
        raise ValueError(
            f"`output_name` {_shown(name)} starts with '.', which hides the file: drop the leading dot"
        )
    stem = stripped[: -len(SUFFIX)] if stripped.lower().endswith(SUFFIX) else stripped
    _check_length(stem, longest_suffix)
    return stripped if stripped.lower().endswith(SUFFIX) else stripped + SUFFIX


def _as_module(name: str, module: LoraAdapter | tuple) -> LoraAdapter:
    """The plain up/down pair a kohya file stores, checked before it is built (so the error names
    the module); a LoraAdapter with Tucker, DoRA or a reshape is no such pair."""
    if isinstance(module, LoraAdapter):
        if module.mid is not None or module.dora_scale is not None or module.reshape is not None:
            raise ValueError(
                f"module '{name}' has a Tucker mid, DoRA or reshape: a kohya LoRA file holds up/down pairs"
            )
        up, down, alpha = module.up, module.down, module.alpha
    else:
        up, down, alpha = module
    if not name or "." in name:
        raise ValueError(
            f"module name {name!r} is not a kohya module name: use names like "
            "'lora_unet_down_blocks_0_attentions_0_proj_in' (no dots)"
        )
    if up.dim() not in (2, 4) or down.dim() != up.dim() or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"module '{name}': up {tuple(up.shape)} and down {tuple(down.shape)} do not chain; "
            "pass up (out, r[,1,1]) and down (r, in[,kh,kw])"
        )
    if alpha is None or not math.isfinite(float(alpha)):
        raise ValueError(f"module '{name}': alpha is {alpha!r}; pass a finite number, usually the rank")
    return module if isinstance(module, LoraAdapter) else LoraAdapter(up=up, down=down, alpha=alpha)


def lora_state_dict(modules: Mapping[str, LoraAdapter | tuple], dtype: torch.dtype | str) -> dict:
    """kohya key -> contiguous CPU tensor in `dtype` (alpha as a 0-dim tensor)."""
    target = resolve_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, raw in modules.items():
        module = _as_module(name, raw)
        tensors[f"{name}.lora_up.weight"] = module.up.detach().to("cpu", target).contiguous()
        tensors[f"{name}.lora_down.weight"] = module.down.detach().to("cpu", target).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=target)
    return tensors


def addnet_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya/sd-webui-additional-networks compute them:
    over the file serialised with only the ss_* metadata."""
    data = safetensors.torch.save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(
                f"metadata {key!r} is {type(value).__name__}: safetensors metadata values must be "
                "strings; json.dumps lists and dicts, str() numbers"
            )
    return dict(metadata)


def save_lora(
    path: str | os.PathLike,
    modules: Mapping[str, LoraAdapter | tuple],
    metadata: Mapping[str, str],
    dtype: torch.dtype | str = torch.float16,
    overwrite: bool = False,
    add_hashes: bool = False,
) -> Path:
    """Write a kohya-format LoRA atomically; returns the path written.

    modules maps a kohya module name to LoraAdapter(up, down, alpha) or an (up, down, alpha)
    tuple. add_hashes adds sshs_model_hash / sshs_legacy_hash (serialises twice).
    """
    target = Path(path)
    if os.path.lexists(target) and not overwrite:
        raise exists_error(target)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"folder {target.parent} does not exist: create it or choose another path")
    tensors = lora_state_dict(modules, dtype)
    meta = _check_metadata(metadata)
    if add_hashes:
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(tensors, meta)
    return write_with(target, lambda tmp: save_tensors(tensors, tmp, meta), overwrite=overwrite)


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None) -> None:
    """safetensors' streaming writer (no second copy of the data in memory), for atomic.write_with."""
    safetensors.torch.save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)


@dataclass(frozen=True)
class MergeSource:
    """One input of a merge as recorded in the file: its file name and weight."""

    name: str
    weight: float
    sha256: str | None = None


def _merge_record(sources: Sequence[MergeSource], method: str | None, rank: int | None, conv_rank) -> str:
    record = {
        "method": method,
        "rank": rank,
        "conv_rank": conv_rank,
        "sources": [{"name": s.name, "weight": s.weight, "sha256": s.sha256} for s in sources],
    }
    return json.dumps(record, ensure_ascii=False)


def kohya_metadata(
    *,
    network_dim: int | str,
    network_alpha: float | str,
    base_model_version: str | None = None,
    output_name: str | None = None,
    v2: bool | None = None,
    conv_dim: int | None = None,
    conv_alpha: float | None = None,
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    merged_from: Sequence[MergeSource] = (),
    merge_method: str | None = None,
    merge_rank: int | None = None,
    merge_conv_rank: int | None = None,
    modelspec_architecture: str | None = None,
    modelspec_implementation: str = "https://github.com/Stability-AI/generative-models",
    timestamp: float | None = None,
) -> dict[str, str]:
    """The ss_* keys kohya-based tools read, plus an optional merge record and modelspec.*.

    network_dim may be "Dynamic" when ranks differ per module (as kohya's resize writes).
    modelspec_architecture e.g. "stable-diffusion-v1/lora" turns on the modelspec.* keys.
    """
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(network_dim),
        "ss_network_alpha": str(network_alpha),
    }
    if base_model_version is not None:
        meta["ss_base_model_version"] = base_model_version
    if v2 is not None:
        meta["ss_v2"] = str(bool(v2))
    if output_name is not None:
        meta["ss_output_name"] = output_name
    if conv_dim is not None:
        conv_args = {"conv_dim": conv_dim, "conv_alpha": conv_alpha if conv_alpha is not None else conv_dim}
        meta["ss_network_args"] = json.dumps(conv_args)
    if tag_frequency is not None:
        meta["ss_tag_frequency"] = json.dumps(tag_frequency, ensure_ascii=False)
    if merged_from:
        meta["lora_foundry.merge"] = _merge_record(merged_from, merge_method, merge_rank, merge_conv_rank)
    if modelspec_architecture is not None:
        meta["modelspec.sai_model_spec"] = "1.0.0"
        meta["modelspec.architecture"] = modelspec_architecture
        meta["modelspec.implementation"] = modelspec_implementation
        meta["modelspec.title"] = output_name or "untitled"
        if timestamp is not None:
            meta["modelspec.date"] = datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()
        if merged_from:
            meta["modelspec.merged_from"] = ", ".join(s.name for s in merged_from)
    return meta
