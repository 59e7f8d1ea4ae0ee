"""Export Train Job node: the run a Train LoRA graph would do, written as a job file
(lora_core.train.job) for scripts/train_job.py to run outside the server, on one or several ranks."""

from __future__ import annotations

import os
from dataclasses import fields

from ..lora_core.files.atomic import write_bytes
from ..lora_core.files.savefile import safe_output_name
from ..lora_core.train.job import SCHEMA, SECTIONS, VERSION, JobError, job_from_dict
from . import comfy_bridge_job as job_bridge
from .train import CATEGORY, LoraTrainingDataset, TrainLora, _tip

NODE = "Export Train Job"
# Train LoRA / dataset node inputs that are connections (or sample images), not settings of a job.
NOT_SETTINGS = frozenset({"model", "clip", "vae", "dataset", "sample_every", "sample_prompt", "sample_seed"})
# node input -> (job section, field) where the names differ
RENAMED = {
    "folder": ("dataset_source", "folder"),
    "cache": ("dataset_source", "cache"),
    "repeats": ("dataset", "default_repeats"),
    "output_name": ("output", "name"),
}


def _settings(spec: dict) -> dict:
    return {name: value for name, value in spec.items() if name not in NOT_SETTINGS}


def job_document(checkpoint: str, inputs: dict) -> dict:
    """The job file's JSON object for a checkpoint name and the nodes' input values: each input goes
    to the section whose dataclass has a field of its name (RENAMED where the names differ)."""
    doc: dict = {"schema": SCHEMA, "version": VERSION, "model": {"checkpoint": checkpoint}}
    owners = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}
    for name, value in inputs.items():
        section, key = RENAMED.get(name, (owners.get(name), name))
        if section is None:
            raise JobError(f"the input `{name}` has no place in a job file; this is a bug in the pack")
        doc.setdefault(section, {})[key] = value
    return doc


class ExportTrainJob:
    DESCRIPTION = (
        "Writes the training run these settings describe as a job file (output/lora_foundry/jobs/<name>.json) "
        "instead of training: run it outside the server with scripts/train_job.py, on one process or on "
        "several GPUs / CPU processes under torchrun. The file has every Train LoRA and dataset setting."
    )
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("job_path",)
    OUTPUT_TOOLTIPS = ("The job file written (a new export of the same name replaces it).",)

    @classmethod
    def INPUT_TYPES(cls):
        dataset = LoraTrainingDataset.INPUT_TYPES()["required"]
        train = TrainLora.INPUT_TYPES()
        checkpoint = _tip((job_bridge.checkpoint_names(),), "The checkpoint the job trains on (models/checkpoints), loaded by ComfyUI's checkpoint loader when the job runs.")  # fmt: skip
        return {
            "required": {"checkpoint": checkpoint, **_settings(dataset), **_settings(train["required"])},
            "optional": _settings(train["optional"]),
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # the file is written on every run, even with unchanged settings

    def execute(self, checkpoint, **inputs):
        # Optional inputs left unset take Train LoRA's own defaults, which can differ from TrainConfig's.
        optional = self.INPUT_TYPES()["optional"]
        inputs = {**{k: spec[1]["default"] for k, spec in optional.items() if "default" in spec[1]}, **inputs}
        try:
            job = job_from_dict(job_document(checkpoint, inputs))
            name = safe_output_name(job.output.name)[: -len(".safetensors")]
            path = os.path.join(job_bridge.jobs_directory(), f"{name}.json")
            write_bytes(path, job.to_json().encode("utf-8"), overwrite=True)
        except (JobError, ValueError, OSError) as e:
            raise RuntimeError(f"[{NODE}] {e}") from e
        return {"ui": {"text": [f"job written: {path}"]}, "result": (path,)}
