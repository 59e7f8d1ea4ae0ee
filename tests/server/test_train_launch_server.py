"""Launch Train Job in a real ComfyUI server: the job runs as a child process of the server; killed
mid-run, the prompt fails with an execution_error on the node that names the kill, and the server
then runs the next prompt."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from comfy_server import PromptFailed
from job_run import COMPACT

pytestmark = pytest.mark.server

CHECKPOINT = COMPACT  # linked into the server's models/checkpoints by tests/server_fixtures.py
# Export Train Job's settings (tests/train_run.py's, which cannot be imported here: it imports ComfyUI)
DATASET_ARGS = dict(resolution=64, trigger_word="zkw", buckets=True, crop="center", flip=False, shuffle_tags=False,
                    keep_tags=0, caption_dropout=0.0, repeats=1, cache="memory")  # fmt: skip
TRAIN_ARGS = dict(steps=3, epochs=0, batch_size=1, grad_accum=1, rank=4, alpha=2.0, targets="attention", blocks="",
                  te_lr=0.0, optimizer="AdamW", scheduler="constant", warmup_steps=0, warmup_ratio=0.0,
                  min_snr_gamma=0.0, noise_offset=0.0, loss="MSE", precision="fp32", gradient_checkpointing=True,
                  seed=1, loraplus_ratio=1.0, dora=False, save_every=0, keep_last=3, save_dtype="fp32",
                  existing="overwrite")  # fmt: skip


def export_inputs(dataset: str, name: str, **changes) -> dict:
    return {"checkpoint": CHECKPOINT, **DATASET_ARGS, "folder": dataset,
            **{**TRAIN_ARGS, "lr": 1e-4, "output_name": name, **changes}}  # fmt: skip


def launch_prompt(dataset: str, name: str, **changes) -> dict:
    return {
        "1": {"class_type": "LoraFoundry_ExportTrainJob", "inputs": export_inputs(dataset, name, **changes)},
        "2": {
            "class_type": "LoraFoundry_LaunchTrainJob",
            "inputs": {
                "job": "(the job_path input)",
                "devices": "cpu",
                "processes": 1,
                "cpu_threads": 1,
                "job_path": ["1", 0],
            },  # fmt: skip
        },
    }


def children_running(parent: int, marker: str) -> list[int]:
    """Processes whose parent is ``parent`` and whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and marker in cmdline:
            found.append(int(entry.name))
    return found


def execution_error(entry: dict) -> dict:
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1, entry["status"]
    return errors[0]


@pytest.mark.timeout(1200)
def test_killed_job_fails_its_prompt_and_the_server_runs_the_next(server, demo_models, server_loras):
    dataset = demo_models["dataset"].name
    prompt_id = server.queue(launch_prompt(dataset, "server_killed", steps=500, save_every=1))
    first = server_loras / "server_killed" / "server_killed-step000001.safetensors"
    deadline = time.monotonic() + 600
    while not first.exists():  # the job has trained a step
        assert time.monotonic() < deadline, server.log_tail()
        assert server.proc.poll() is None
        time.sleep(0.2)
    jobs = children_running(server.proc.pid, "server_killed.json")
    assert len(jobs) == 1, jobs
    os.kill(jobs[0], signal.SIGKILL)

    with pytest.raises(PromptFailed) as e:
        server.wait(prompt_id, timeout=300)
    err = execution_error(e.value.entry)
    assert err["node_type"] == "LoraFoundry_LaunchTrainJob" and err["node_id"] == "2"
    message = err["exception_message"]
    assert message.startswith("[Launch Train Job] the training job was killed by SIGKILL"), message
    assert "training server_killed: " in message  # its last lines of output

    # the server is alive and runs the next prompt; the killed job's checkpoint stays
    assert server.proc.poll() is None
    entry = server.run({"1": {"class_type": "LoraFoundry_ExportTrainJob",
                              "inputs": export_inputs(dataset, "server_next")}}, timeout=300)  # fmt: skip
    assert entry["outputs"]["1"]["text"][0].endswith(os.path.join("lora_foundry", "jobs", "server_next.json"))
    assert first.exists() and not children_running(server.proc.pid, "train_job.py")
