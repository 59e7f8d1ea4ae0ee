"""Files of a training run in models/loras/<name>/: LoRA checkpoints (kohya keys, ss_* metadata),
the training state beside each (safetensors + JSON, never pickle), and keeping the last K.

Layout: ``<name>-step000100.safetensors`` every N steps, ``<name>.safetensors`` at the end, and
``<stem>.trainstate`` (safetensors bytes; not a .safetensors name, so ComfyUI's LoRA list does not
show it) with ``<stem>.trainstate.json``. Every file is written to a temp name and renamed; the
JSON is written last, so a state counts only once both halves are complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from ..savefile import lora_state_dict, resolve_dtype
from .network import LoraNetwork

STATE_SUFFIX = ".trainstate"
STEP_RE = re.compile(r"-step(\d+)$")


@dataclass(frozen=True)
class CheckpointPlan:
    folder: Path
    name: str
    every: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 3  # step checkpoints kept (0: keep all)
    dtype: str = "fp16"  # dtype of the saved LoRA (the state keeps float32)
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_last < 0:
            raise ValueError(
                f"`save_every` and `keep_last` should be 0 or more, got {self.every}, {self.keep_last}"
            )
        resolve_dtype(self.dtype)

    def stem(self, step: int | None) -> str:
        return self.name if step is None else f"{self.name}-step{step:06d}"

    def lora_path(self, step: int | None) -> Path:
        return self.folder / f"{self.stem(step)}.safetensors"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def lora_tensors(networks: Mapping[str, LoraNetwork], dtype: str) -> dict[str, Tensor]:
    """kohya keys of every network: lora_up/lora_down/alpha, plus dora_scale for DoRA."""
    modules, dora = {}, {}
    for net in networks.values():
        for name, entry in net.export().items():
            modules[name] = (entry["up"], entry["down"], float(entry["alpha"]))
            if "dora_scale" in entry:
                dora[f"{name}.dora_scale"] = entry["dora_scale"].to(resolve_dtype(dtype)).contiguous()
    return {**lora_state_dict(modules, dtype), **dora}


def write_lora(
    path: Path, networks: Mapping[str, LoraNetwork], metadata: Mapping[str, str], dtype: str
) -> Path:
    data = safetensors.torch.save(lora_tensors(networks, dtype), metadata=dict(metadata))
    _atomic_write(Path(path), data)
    return Path(path)


def write_state(path_stem: Path, tensors: Mapping[str, Tensor], info: Mapping) -> None:
    state_path = Path(f"{path_stem}{STATE_SUFFIX}")
    _atomic_write(state_path, safetensors.torch.save(dict(tensors)))
    _atomic_write(Path(f"{state_path}.json"), json.dumps(info).encode("utf-8"))


def read_state(state_json: Path) -> tuple[dict[str, Tensor], dict]:
    info = json.loads(Path(state_json).read_text(encoding="utf-8"))
    tensors_path = Path(str(state_json)[: -len(".json")])
    return safetensors.torch.load_file(str(tensors_path)), info


def list_states(plan: CheckpointPlan) -> list[tuple[int, Path]]:
    """(step, json path) of complete states in the run folder, oldest first."""
    found = []
    if not plan.folder.is_dir():
        return found
    for entry in plan.folder.glob(f"*{STATE_SUFFIX}.json"):
        tensors_path = Path(str(entry)[: -len(".json")])
        if not tensors_path.exists():
            continue
        stem = tensors_path.name[: -len(STATE_SUFFIX)]
        if stem != plan.name and not (stem.startswith(plan.name) and STEP_RE.search(stem)):
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):
            found.append((int(json.loads(entry.read_text(encoding="utf-8"))["step"]), entry))
    return sorted(found)


def save_checkpoint(
    plan: CheckpointPlan, networks, state: tuple[dict, dict], metadata: Mapping[str, str], final: bool
) -> Path:
    """Writes the LoRA and its state; returns the LoRA path. Older step checkpoints beyond keep_last go."""
    tensors, info = state
    step = None if final else int(info["step"])
    path = write_lora(plan.lora_path(step), networks, metadata, plan.dtype)
    write_state(plan.folder / plan.stem(step), tensors, info)
    if not final:
        prune(plan)
    return path


def prune(plan: CheckpointPlan) -> list[Path]:
    """Deletes step checkpoints (LoRA + state) older than the last keep_last; returns what went."""
    if plan.keep_last <= 0:
        return []
    steps = []
    for p in plan.folder.glob(f"{plan.name}-step*.safetensors"):
        m = STEP_RE.search(p.name[: -len(".safetensors")])
        if m and p.name[: -len(".safetensors")] == plan.stem(int(m[1])):
            steps.append(int(m[1]))
    removed = []
    for step in sorted(steps)[: -plan.keep_last]:
        base = plan.folder / plan.stem(step)
        for path in (
            Path(f"{base}.safetensors"),
            Path(f"{base}{STATE_SUFFIX}"),
            Path(f"{base}{STATE_SUFFIX}.json"),
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def load_lora_weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))
