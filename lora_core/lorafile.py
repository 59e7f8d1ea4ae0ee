"""Reading LoRA files safely: safetensors, or pickles loaded with ``weights_only`` (never runs code)."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".pt", ".ckpt", ".bin", ".pth")
_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format itself refuses larger headers
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_REDOWNLOAD = "download the file again (it may be incomplete or damaged)"


class LoraFileError(ValueError):
    """A LoRA file that cannot be used; the message names the file, the key and what to do."""


@dataclass(frozen=True)
class LoraFile:
    path: str
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file into tensors and header metadata, refusing anything unsafe or damaged."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise LoraFileError(f"{name}: no such file ({path}); check the name and the loras folder")
    ext = os.path.splitext(path)[1].lower()
    if ext in SAFETENSORS_EXT:
        tensors, metadata = _read_safetensors(path, name)
    elif ext in PICKLE_EXT:
        tensors, metadata = _read_pickle(path, name), {}
    else:
        raise LoraFileError(
            f"{name}: unsupported file type '{ext}'; LoRA files must be .safetensors "
            f"(or {', '.join(PICKLE_EXT)} loaded without running code)"
        )
    if not tensors:
        raise LoraFileError(f"{name}: the file holds no tensors; it is not a LoRA. Pick another file")
    _check_finite(tensors, name)
    return LoraFile(path=path, tensors=tensors, metadata=metadata)


def _read_header(path: str, name: str) -> dict:
    size = os.path.getsize(path)
    if size == 0:
        raise LoraFileError(f"{name}: the file is empty (0 bytes); {_REDOWNLOAD}")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraFileError(
                f"{name}: only {size} bytes, too short for a safetensors header; {_REDOWNLOAD}"
            )
        (n,) = struct.unpack("<Q", head)
        if n > _HEADER_LIMIT or 8 + n > size:
            raise LoraFileError(
                f"{name}: not a valid safetensors file (header says {n} bytes, file has {size}); {_REDOWNLOAD}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(
            f"{name}: the safetensors header is not valid JSON ({e}); {_REDOWNLOAD}"
        ) from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{name}: the safetensors header is not a JSON object; {_REDOWNLOAD}")
    _check_entries(header, size - 8 - n, name)
    return header


def _check_entries(header: dict, data_size: int, name: str) -> None:
    """Every tensor's byte range must lie inside the file and match its dtype and shape."""
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(d) for d in shape)
        except (TypeError, KeyError, ValueError):
            raise LoraFileError(f"{name}: header entry for '{key}' is malformed; {_REDOWNLOAD}") from None
        if not (0 <= start <= end <= data_size):
            raise LoraFileError(
                f"{name}: tensor '{key}' claims bytes {start}..{end} but the data section has {data_size} bytes "
                f"(truncated file or lying header); {_REDOWNLOAD}"
            )
        width = _DTYPE_BYTES.get(dtype)
        if width is not None and numel * width != end - start:
            raise LoraFileError(
                f"{name}: tensor '{key}' is {dtype} {shape} ({numel * width} bytes) but the header gives it "
                f"{end - start} bytes; {_REDOWNLOAD}"
            )


def _read_safetensors(path: str, name: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    header = _read_header(path, name)
    raw_meta = header.get("__metadata__") or {}
    metadata = {str(k): str(v) for k, v in raw_meta.items()} if isinstance(raw_meta, dict) else {}
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LoraFileError(f"{name}: safetensors could not read the file ({e}); {_REDOWNLOAD}") from None
    return tensors, metadata


def _read_pickle(path: str, name: str) -> dict[str, Tensor]:
    if os.path.getsize(path) == 0:
        raise LoraFileError(f"{name}: the file is empty (0 bytes); {_REDOWNLOAD}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(name, str(e)) from None
    except Exception as e:  # noqa: BLE001 - on garbage the safe unpickler raises IndexError, KeyError, ...
        raise LoraFileError(f"{name}: not a readable PyTorch file ({str(e)[:200]}); {_REDOWNLOAD}") from None
    if isinstance(obj, dict) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # some trainers wrap the weights one level down
    if not isinstance(obj, dict):
        raise LoraFileError(
            f"{name}: holds a {type(obj).__name__}, not a dict of named tensors; it is not a LoRA"
        )
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise LoraFileError(
                f"{name}: entry '{key}' is a {type(value).__name__}, not a tensor; "
                "a LoRA file must hold tensors only (re-save it as .safetensors)"
            )
    return {str(k): v for k, v in obj.items()}


def _unpickling_error(name: str, message: str) -> LoraFileError:
    detail = [line.strip() for line in message.splitlines() if "GLOBAL" in line or "Unsupported" in line]
    why = f" ({detail[0][:200]})" if detail else ""
    if "GLOBAL" in message:
        return LoraFileError(
            f"{name}: refused to load: the pickle wants to import Python objects or run code{why}. "
            "Safe loading never does that; get a .safetensors version of this LoRA"
        )
    return LoraFileError(f"{name}: not a readable PyTorch file{why}; {_REDOWNLOAD}")


def _check_finite(tensors: dict[str, Tensor], name: str) -> None:
    for key, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if t.element_size() == 1:
            t = t.float()  # float8 has no abs/isfinite kernels
        # Fast path: the largest magnitude is finite exactly when every value is (max propagates
        # NaN, abs turns -Inf into Inf); isfinite runs only to name the problem.
        if bool(torch.isfinite(t.abs().max())):
            continue
        if not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise LoraFileError(
                f"{name}: tensor '{key}' contains {bad} values; the LoRA was saved from a diverged training run. "
                "Use an earlier checkpoint of it"
            )
