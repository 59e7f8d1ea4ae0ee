"""A run folder's files before a run starts: which belong to the run, and what ``existing`` does
with them (resume from them, delete them, or stop with an error).

The file layout itself is lora_core.train.state's; this module only asks it which names a run uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from .state import STATE_SUFFIX, CheckpointPlan

Existing = Literal["resume", "overwrite", "error"]
EXISTING: tuple[str, ...] = get_args(Existing)


def run_files(plan: CheckpointPlan) -> list[Path]:
    """The files in the plan's folder that a run of this name wrote: the final LoRA and state, and
    every step checkpoint. Other runs' files sharing the folder are not counted."""
    if not plan.folder.is_dir():
        return []
    names = {f"{plan.name}.safetensors", f"{plan.name}{STATE_SUFFIX}", f"{plan.name}{STATE_SUFFIX}.json"}
    return sorted(
        p for p in plan.folder.iterdir() if p.name in names or p.name.startswith(f"{plan.name}-step")
    )


def handle_existing(plan: CheckpointPlan, existing: Existing) -> None:
    """Before a run: 'resume' leaves the files (the run resumes from the newest state), 'overwrite'
    deletes them, 'error' refuses when there are any."""
    if existing not in EXISTING:
        raise ValueError(f"`existing` should be one of {', '.join(EXISTING)}, got {existing!r}")
    files = run_files(plan)
    if not files or existing == "resume":
        return
    if existing == "error":
        raise ValueError(
            f"{plan.folder} already has {len(files)} files of a run named '{plan.name}': choose another "
            "output_name, or set `existing` to 'resume' or 'overwrite'"
        )
    for path in files:
        path.unlink()
