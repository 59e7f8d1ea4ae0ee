"""Reading LoRA files safely: safetensors, or pickles loaded with ``weights_only`` (never runs code)."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

import torch
from torch import Tensor

from .metadata import MAX_KEYS, MAX_TAG_VALUE, MAX_TOTAL, MAX_VALUE, bounded_metadata

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".pt", ".ckpt", ".bin", ".pth")
_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format itself refuses larger headers
MAX_TENSORS = 100_000  # a full LyCORIS network on a large DiT has ~15k; more only costs memory
_MAX_DIMS = 8
_MAX_DIM = 2**31 - 1
# safetensors dtype names -> torch dtypes (the float8 variants where this torch has them)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    **{n: getattr(torch, t) for n, t in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                                         ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"))
       if hasattr(torch, t)},
}  # fmt: skip
_REDOWNLOAD = "download the file again (it may be incomplete or damaged)"


class LoraFileError(ValueError):
    """A LoRA file that cannot be used; the message names the file, the key and what to do."""


@dataclass(frozen=True)
class LoraFile:
    path: str
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what of the header was left out, for the user's report


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file into tensors and header metadata, refusing anything unsafe or damaged."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise LoraFileError(f"{name}: no such file ({path}); check the name and the loras folder")
    ext = os.path.splitext(path)[1].lower()
    if ext not in SAFETENSORS_EXT + PICKLE_EXT:
        raise LoraFileError(
            f"{name}: unsupported file type '{ext}'; LoRA files must be .safetensors "
            f"(or {', '.join(PICKLE_EXT)} loaded without running code)"
        )
    try:
        if ext in SAFETENSORS_EXT:
            tensors, metadata, notes = _read_safetensors(path, name)
        else:
            tensors, metadata, notes = _read_pickle(path, name), {}, ()
    except OSError as e:
        raise LoraFileError(
            f"{name}: could not be read ({e.strerror or e}); check that it is still in the loras folder "
            f"and readable, or {_REDOWNLOAD}"
        ) from None
    if not tensors:
        raise LoraFileError(f"{name}: the file holds no tensors; it is not a LoRA. Pick another file")
    _check_finite(tensors, name)
    return LoraFile(path=path, tensors=tensors, metadata=metadata, notes=notes)


def _read_header(f: BinaryIO, size: int, name: str) -> tuple[dict, int]:
    """The header JSON object and its length in bytes."""
    if size == 0:
        raise LoraFileError(f"{name}: the file is empty (0 bytes); {_REDOWNLOAD}")
    head = f.read(8)
    if len(head) < 8:
        raise LoraFileError(f"{name}: only {size} bytes, too short for a safetensors header; {_REDOWNLOAD}")
    (n,) = struct.unpack("<Q", head)
    if n > _HEADER_LIMIT or 8 + n > size:
        raise LoraFileError(
            f"{name}: not a valid safetensors file (header says {n} bytes, file has {size}); {_REDOWNLOAD}"
        )
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise LoraFileError(
            f"{name}: the safetensors header is not valid JSON ({str(e)[:200]}); {_REDOWNLOAD}"
        ) from None
    except RecursionError:
        raise LoraFileError(
            f"{name}: the safetensors header JSON is nested too deeply to be a LoRA's; {_REDOWNLOAD}"
        ) from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{name}: the safetensors header is not a JSON object; {_REDOWNLOAD}")
    return header, n


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _entries(header: dict, data_size: int, name: str) -> dict[str, _Entry]:
    """Every tensor's byte range must lie inside the file and match its dtype and shape."""
    out: dict[str, _Entry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if len(out) >= MAX_TENSORS:
            raise LoraFileError(
                f"{name}: the header lists more than {MAX_TENSORS} tensors, far more than any LoRA has; "
                f"{_REDOWNLOAD}"
            )
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ints = [*shape, start, end]
        except (TypeError, KeyError, ValueError):
            raise LoraFileError(f"{name}: header entry for '{key}' is malformed; {_REDOWNLOAD}") from None
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints) or not (
            len(shape) <= _MAX_DIMS and all(d <= _MAX_DIM for d in shape)
        ):
            raise LoraFileError(
                f"{name}: header entry for '{key}' has shape {str(shape)[:80]} and offsets "
                f"{str([start, end])[:80]}, not the non-negative integers a tensor has; {_REDOWNLOAD}"
            )
        if dtype not in _DTYPES:
            raise LoraFileError(
                f"{name}: tensor '{key}' has dtype {str(dtype)[:40]!r}, which no LoRA uses; "
                "re-save the file with float32, float16 or bfloat16 tensors"
            )
        if not (start <= end <= data_size):
            raise LoraFileError(
                f"{name}: tensor '{key}' claims bytes {start}..{end} but the data section has {data_size} bytes "
                f"(truncated file or lying header); {_REDOWNLOAD}"
            )
        width = _DTYPES[dtype].itemsize
        numel = math.prod(shape)
        if numel * width != end - start:
            raise LoraFileError(
                f"{name}: tensor '{key}' is {dtype} {list(shape)} ({numel * width} bytes) but the header gives it "
                f"{end - start} bytes; {_REDOWNLOAD}"
            )
        out[key] = _Entry(_DTYPES[dtype], tuple(shape), start, end)
    return out


def _read_safetensors(path: str, name: str) -> tuple[dict[str, Tensor], dict[str, str], tuple[str, ...]]:
    """Tensors, the header metadata the pack uses, and notes on what of it was too large to keep.

    The header is parsed once, here (safetensors' own loader would parse it again, costly for a
    huge one); the data section is read in one piece and each tensor is a view of its bytes
    (little-endian, as the format stores it and every platform ComfyUI runs on reads it)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, n = _read_header(f, size, name)
        entries = _entries(header, size - 8 - n, name)
        data = bytearray(size - 8 - n)
        if f.readinto(data) != len(data):
            raise LoraFileError(f"{name}: the file changed while it was read; load it again")
    tensors = {key: _tensor(data, e) for key, e in entries.items()}
    raw_meta = header.get("__metadata__")
    meta = bounded_metadata(raw_meta if isinstance(raw_meta, dict) else {})
    notes = tuple(_dropped_note(key, chars) for key, chars in meta.dropped[:3])
    if len(meta.dropped) > 3:
        notes += (f"... and {len(meta.dropped) - 3} more header metadata keys ignored",)
    return tensors, meta.kept, notes


def _dropped_note(key: str, chars: int) -> str:
    return (
        f"header metadata '{key[:60]}' ({chars / 2**20:.1f} MB) is beyond what the pack reads of a header "
        f"({MAX_TAG_VALUE // 2**20} MB for tag counts, {MAX_VALUE // 2**20} MB for other values, "
        f"{MAX_TOTAL // 2**20} MB and {MAX_KEYS} keys in all); it was ignored"
    )


def _tensor(data: bytearray, e: _Entry) -> Tensor:
    count = e.end - e.start
    if count == 0:
        return torch.empty(e.shape, dtype=e.dtype)
    raw = torch.frombuffer(data, dtype=torch.uint8, count=count, offset=e.start)
    if e.start % e.dtype.itemsize:  # a view as a wider type needs an aligned start
        raw = raw.clone()
    return raw.view(e.dtype).reshape(e.shape)


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
    if len(obj) > MAX_TENSORS:
        raise LoraFileError(f"{name}: holds {len(obj)} entries, far more than any LoRA has; {_REDOWNLOAD}")
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
