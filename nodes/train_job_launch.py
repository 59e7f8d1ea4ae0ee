"""Launch Train Job node: runs a job file (Export Train Job) in a separate process, on one or several
ranks, and streams its progress back as Train LoRA's live-loss events; Cancel stops the job (it
saves its last step first), a job that dies is an error on the node with its last lines."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..lora_core.files.confine import is_within
from ..lora_core.train.job import JobError, read_job
from ..lora_core.train.launch import JobProcess, job_command, job_environment, parse_devices
from ..lora_core.train.plot import loss_curve
from . import comfy_bridge as bridge
from . import comfy_bridge_job as job_bridge
from . import comfy_bridge_train as train_bridge
from .train import CATEGORY, _tip

NODE = "Launch Train Job"
FROM_INPUT = "(the job_path input)"
PACK_DIR = Path(__file__).resolve().parents[1]
SCRIPT = PACK_DIR / "scripts" / "train_job.py"
POLL_S = 0.25


def job_file(job: str, job_path: str | None) -> str:
    """The job file to run: ``job_path`` when connected, else ``job`` in the jobs folder; either way
    a regular file inside output/lora_foundry/jobs."""
    folder = job_bridge.jobs_directory()
    if job_path:
        path, field = job_path, "job_path"
    elif job and job != FROM_INPUT:
        if os.path.basename(job) != job:
            raise ValueError(f"`job` {job[:80]!r} should be a file name in {folder}")
        path, field = os.path.join(folder, job), "job"
    else:
        raise ValueError(
            f"choose a `job` from {folder}, or connect Export Train Job's job_path to `job_path`"
        )
    real = os.path.realpath(path)
    if not is_within(real, os.path.realpath(folder)) or real == os.path.realpath(folder):
        raise ValueError(
            f"`{field}` {str(path)[:200]!r} is outside {folder}: only job files there can be launched"
        )
    if not os.path.isfile(real):
        raise ValueError(f"`{field}`: no job file {str(path)[:200]!r}; export one with Export Train Job")
    return real


class LaunchTrainJob:
    DESCRIPTION = (
        "Runs a training job (a file written by Export Train Job) in a separate process, on the CPU or on "
        "the GPUs listed (several: one rank each, under torch.distributed.run), and shows its live loss. "
        "A crash or out-of-memory in training does not take the server down: it is reported here with the "
        "job's last lines of output. Cancel stops the job after it saves its last step (run again to resume)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("lora_name", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "The trained file's name as Load LoRA lists it (<name>/<name>.safetensors).",
        "Loss per step (raw and smoothed) with the learning rate on a second axis.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "job": _tip(([FROM_INPUT, *job_bridge.job_names()],), "A job file in output/lora_foundry/jobs (written by Export Train Job). Ignored when job_path is connected."),
                "devices": _tip(("STRING", {"default": "cpu"}), "Where the job trains: 'cpu', or GPU numbers separated by commas ('0', '0,1'); several GPUs train as one rank each (data parallel, global batch = batch_size x ranks)."),
                "processes": _tip(("INT", {"default": 1, "min": 1, "max": 64}), "Ranks on the CPU when devices is 'cpu' (for testing data parallel; a GPU list gives one rank per GPU)."),
                "cpu_threads": _tip(("INT", {"default": 0, "min": 0, "max": 256}), "Threads per CPU rank (0: the cores shared among the ranks)."),
            },
            "optional": {
                "job_path": _tip(("STRING", {"forceInput": True}), "Connect Export Train Job's job_path to run the job it just wrote."),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }  # fmt: skip

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # a launch trains (or resumes) every time it is queued

    def execute(self, job, devices, processes, cpu_threads, job_path=None, unique_id=None):
        try:
            path = job_file(job, job_path)
            spec = read_job(path)
            where = parse_devices(devices, processes)
        except (JobError, ValueError, OSError) as e:
            raise RuntimeError(f"[{NODE}] {e}") from e
        argv = job_command(sys.executable, SCRIPT, path, where,
                           ["--comfyui", job_bridge.comfy_directory(), *job_bridge.folder_arguments()])  # fmt: skip
        env = job_environment(dict(os.environ), where, cpu_threads)
        total = spec.train.steps if spec.train.epochs == 0 else 1
        on_progress, _ = bridge.progress_callbacks(total)
        losses, lrs, done = [], [], None
        process = JobProcess(argv, env, cwd=str(PACK_DIR))
        try:
            code = None
            while code is None:
                if not process.running():
                    code = process.wait(30)  # then read what it printed last
                for event in process.next_events(0 if code is not None else POLL_S):
                    if event["event"] == "step":
                        losses.append(event["loss"])
                        lrs.append(event["lr"])
                        data = {k: event[k] for k in ("step", "total", "loss", "lr", "eta_s")}
                        train_bridge.send_event({"node": unique_id, **data})
                        on_progress(event["step"], event["total"])
                    elif event["event"] == "done":
                        done = event
                if code is None and job_bridge.interrupted():
                    process.stop()
                    bridge.check_interrupted()  # raises ComfyUI's interruption
        finally:
            if process.running():  # an error in this loop: the job must not outlive the node
                process.kill()
                process.wait(30)
        if code != 0 or done is None:
            raise RuntimeError(f"[{NODE}] {process.failure(code)}")
        lora_name = bridge.register_new_lora(done["path"])
        curve = torch.from_numpy(loss_curve(losses, lrs))[None]
        text = f"{lora_name}: {done['step']} steps" + (f", final loss {losses[-1]:.4f}" if losses else "")
        return {"ui": {"text": [text], bridge.LORA_WRITTEN: [lora_name]}, "result": (lora_name, curve)}
