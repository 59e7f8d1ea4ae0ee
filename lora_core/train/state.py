"""Files of a training run in models/loras/<name>/: LoRA checkpoints (kohya keys, ss_* metadata),
the training state beside each (safetensors + JSON, never pickle), and keeping the last K.

Layout: ``<name>-step000100.safetensors`` every N steps, ``<name>.safetensors`` at the end, and
``<stem>.trainstate`` (safetensors bytes; not a .safetensors name, so ComfyUI's LoRA list does not
show it) with ``<stem>.trainstate.json``. Every file goes through the pack's atomic writer; the
JSON is written last, so a state counts only once both halves are complete. A state damaged
after the fact (a disk error, a copy cut short) is named by read_state, so the run can fall back
to the state before it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from ..files.atomic import write_bytes, write_with
from ..files.savefile import lora_state_dict, resolve_dtype, save_tensors
from .key_names import Piece, split_lora
from .network import LoraNetwork

STATE_SUFFIX = ".trainstate"
STEP_RE = re.compile(r"-step(\d+)$")
# The longest ending a run puts after its name (a step count of up to 10 digits), for the
# output-name length check (savefile.safe_output_name).
LONGEST_SUFFIX = f"-step{0:010d}{STATE_SUFFIX}.json"
# What a state must hold to be loaded (Trainer.state writes them; anything less is damage).
STATE_INFO_KEYS = ("step", "epoch", "position", "config", "history", "optimizer", "scaler", "rng")
STATE_TENSORS = ("rng.trainer", "rng.torch", "rng.numpy")


class DamagedStateError(ValueError):
    """A training state file cannot be read or is incomplete; the message names the file."""

    def __init__(self, path: Path, why: str):
        self.path, self.why = Path(path), why
        super().__init__(
            f"training state {self.path.name} in {self.path.parent} is damaged ({why}); it cannot be resumed "
            "from. Delete it to resume from an older state, or set `existing` to 'overwrite' to start over"
        )


@dataclass(frozen=True)
class CheckpointPlan:
    folder: Path
    name: str
    every: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 3  # step checkpoints kept (0: keep all)
    dtype: str = "fp16"  # dtype of the saved LoRA (the state keeps float32)
    metadata: Mapping[str, str] = field(default_factory=dict)
    # None: kohya names; else diffusers / PEFT names, each trained module's pieces (key_names.py)
    pieces: Mapping[str, tuple[Piece, ...]] | None = None

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
    # Kept for train/dataset.py's latent cache until it calls lora_core.files.atomic itself.
    write_bytes(path, data, overwrite=True)


def lora_tensors(networks: Mapping[str, LoraNetwork], dtype: str) -> dict[str, Tensor]:
    """kohya keys of every network: lora_up/lora_down/alpha, plus dora_scale for DoRA."""
    modules, dora = {}, {}
    for net in networks.values():
        for name, entry in net.export().items():
            modules[name] = (entry["up"], entry["down"], float(entry["alpha"]))
            if "dora_scale" in entry:
                dora[f"{name}.dora_scale"] = entry["dora_scale"].to(resolve_dtype(dtype)).contiguous()
    return {**lora_state_dict(modules, dtype), **dora}


def diffusers_tensors(
    networks: Mapping[str, LoraNetwork], dtype: str, pieces: Mapping[str, tuple[Piece, ...]]
) -> dict[str, Tensor]:
    """diffusers / PEFT keys of every network: lora_A / lora_B per diffusers module, alpha / rank
    folded into lora_B (key_names.split_lora), no alpha."""
    target = resolve_dtype(dtype)
    out = {}
    for net in networks.values():
        for name, entry in net.export().items():
            if "dora_scale" in entry or name not in pieces:
                why = "DoRA" if "dora_scale" in entry else "no diffusers name"
                raise ValueError(
                    f"{name} cannot be saved under diffusers names ({why}); set `key_names` to 'kohya'"
                )
            out |= split_lora(entry["down"], entry["up"], float(entry["alpha"]), pieces[name])
    return {k: v.to("cpu", target).contiguous() for k, v in out.items()}


def write_lora(
    path: Path,
    networks: Mapping[str, LoraNetwork],
    metadata: Mapping[str, str],
    dtype: str,
    pieces: Mapping[str, tuple[Piece, ...]] | None = None,
) -> Path:
    """Writes the LoRA under kohya names, or under diffusers names when ``pieces`` is given."""
    tensors = lora_tensors(networks, dtype) if pieces is None else diffusers_tensors(networks, dtype, pieces)
    return write_with(Path(path), lambda tmp: save_tensors(tensors, tmp, metadata), overwrite=True)


def write_state(path_stem: Path, tensors: Mapping[str, Tensor], info: Mapping) -> None:
    state_path = Path(f"{path_stem}{STATE_SUFFIX}")
    write_with(state_path, lambda tmp: save_tensors(tensors, tmp, None), overwrite=True)
    write_bytes(Path(f"{state_path}.json"), json.dumps(info).encode("utf-8"), overwrite=True)


def read_state(state_json: Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, info) of a state; DamagedStateError naming the file if either half is unreadable
    or lacks what Trainer.load_state needs."""
    state_json = Path(state_json)
    tensors_path = Path(str(state_json)[: -len(".json")])
    try:
        info = json.loads(state_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DamagedStateError(state_json, f"{type(e).__name__}: {e}") from e
    if not isinstance(info, dict) or any(k not in info for k in STATE_INFO_KEYS):
        missing = [k for k in STATE_INFO_KEYS if not isinstance(info, dict) or k not in info]
        raise DamagedStateError(state_json, f"missing {', '.join(missing)}")
    if not isinstance(info["step"], int) or info["step"] < 0:
        raise DamagedStateError(state_json, f"step is {info['step']!r}")
    wrong = [k for k in ("config", "history", "optimizer", "scaler", "rng") if not isinstance(info[k], dict)]
    if wrong:
        raise DamagedStateError(state_json, f"{', '.join(wrong)} not a JSON object")
    try:
        tensors = safetensors.torch.load_file(str(tensors_path))
    except (OSError, safetensors.SafetensorError, ValueError, RuntimeError) as e:
        raise DamagedStateError(tensors_path, f"{type(e).__name__}: {e}") from e
    missing = [k for k in STATE_TENSORS if k not in tensors]
    if missing:
        raise DamagedStateError(tensors_path, f"missing {', '.join(missing)}")
    return tensors, info


def _recorded_step(state_json: Path, stem: str, plan: CheckpointPlan) -> float:
    """The step a state's JSON records; for a JSON that does not read, the step its name says (the
    final state, which has none, is the newest of a run), so a damaged state still sorts in place."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, RecursionError):
        return int(json.loads(state_json.read_text(encoding="utf-8"))["step"])
    m = STEP_RE.search(stem)
    return int(m[1]) if m and stem == plan.stem(int(m[1])) else float("inf")


def list_states(plan: CheckpointPlan) -> list[tuple[float, Path]]:
    """(step, json path) of the states in the run folder whose two halves exist, oldest first.
    A state whose JSON does not read is listed by the step in its name; read_state tells."""
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
        found.append((_recorded_step(entry, stem, plan), entry))
    return sorted(found)


def save_checkpoint(
    plan: CheckpointPlan, networks, state: tuple[dict, dict], metadata: Mapping[str, str], final: bool
) -> Path:
    """Writes the LoRA and its state; returns the LoRA path. Older step checkpoints beyond keep_last go."""
    tensors, info = state
    step = None if final else int(info["step"])
    path = write_lora(plan.lora_path(step), networks, metadata, plan.dtype, plan.pieces)
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
