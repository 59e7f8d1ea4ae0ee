"""Launch Train Job in the graph: the job runs in a separate process (scripts/train_job.py, one rank
or two gloo ranks under torch.distributed.run) and trains the same LoRA as the headless command; its
progress comes back as Train LoRA's live-loss events; a killed job is an error naming the exit and
its last lines; Cancel stops every rank, and the checkpoint of the last step stays loadable."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import comfy.model_management
import pytest
import safetensors
from job_run import COMPACT, SETTINGS, run_headless
from train_run import DATASET_ARGS, TRAIN_ARGS

from lora_foundry.lora_core.train import launch
from lora_foundry.lora_core.train.state import read_state
from lora_foundry.nodes import comfy_bridge_train as train_bridge
from lora_foundry.nodes import train_job_launch
from lora_foundry.nodes.train_job import ExportTrainJob
from lora_foundry.nodes.train_job_launch import FROM_INPUT, LaunchTrainJob

# jobs of more than one rank keep the data-set cache on disk; other tests count its files
pytestmark = pytest.mark.usefixtures("clean_cache")


@pytest.fixture(autouse=True)
def checkpoint(compact_sd15):
    """The compact SD1.5 checkpoint, linked into the base's models/checkpoints."""
    return compact_sd15


@pytest.fixture
def events(monkeypatch):
    """The lora_foundry.train events the node sends, and the job processes it starts."""
    sent: list[dict] = []
    started: list[launch.JobProcess] = []
    monkeypatch.setattr(train_bridge, "send_event", lambda data: sent.append(dict(data)))

    class Recorded(launch.JobProcess):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(train_job_launch, "JobProcess", Recorded)
    yield sent, started
    comfy.model_management.interrupt_current_processing(False)
    for job in started:  # none may outlive its test
        if job.running():
            job.kill()
            job.wait(30)


def export(name: str, **changes) -> Path:
    settings = {**TRAIN_ARGS, **SETTINGS, "output_name": name, **changes}
    return Path(
        ExportTrainJob().execute(COMPACT, **{**DATASET_ARGS, "folder": "train_set"}, **settings)["result"][0]
    )


def weights(path) -> dict:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def launch_in_thread(**inputs) -> tuple[threading.Thread, dict]:
    """Runs the node in a thread (as the server's executor does); its result or error in the dict."""
    out: dict = {}

    def run():
        try:
            out["result"] = LaunchTrainJob().execute(**{"job": FROM_INPUT, "devices": "cpu", "processes": 1,
                                                         "cpu_threads": 1, "unique_id": "12", **inputs})  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_for_steps(sent: list[dict], thread: threading.Thread, count: int = 1, timeout: float = 900) -> None:
    end = time.monotonic() + timeout
    while len(sent) < count:
        assert thread.is_alive(), "the node ended before the job reported a step"
        assert time.monotonic() < end, "no step event in time"
        time.sleep(0.1)


@pytest.mark.timeout(1800)
def test_launched_job_equals_headless_and_streams_events(dataset_dir, comfy_base, loras_dir, events):
    sent, started = events
    headless = run_headless(export("headless_twin"), comfy_base)
    assert headless.returncode == 0, headless.stderr[-3000:]
    job = export("launched")
    out = LaunchTrainJob().execute(FROM_INPUT, "cpu", 1, 1, job_path=str(job), unique_id="12")
    lora_name, curve = out["result"]
    assert lora_name == "launched/launched.safetensors"
    assert curve.ndim == 4 and curve.shape[-1] == 3
    a = weights(loras_dir / "headless_twin" / "headless_twin.safetensors")
    b = weights(loras_dir / "launched" / "launched.safetensors")
    assert set(a) == set(b) and len(a) > 0
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    # Train LoRA's event shape, for this node, one per step, losses as the job printed them
    assert [e["step"] for e in sent] == [1, 2]
    assert all(set(e) == {"node", "step", "total", "loss", "lr", "eta_s"} and e["node"] == "12" for e in sent)
    assert all(e["total"] == 2 and e["loss"] > 0 and e["lr"] == pytest.approx(1e-4) for e in sent)
    printed = [line for line in headless.stdout.splitlines() if line.startswith("step ")]
    assert [f"{e['loss']:.6f}" for e in sent] == [line.split()[3] for line in printed]
    assert len(started) == 1 and not started[0].running()
    assert "--events" in started[0].argv and "torch.distributed.run" not in started[0].argv


@pytest.mark.timeout(1800)
def test_killed_job_is_an_error_with_exit_and_last_lines(dataset_dir, comfy_base, loras_dir, events):
    sent, started = events
    thread, out = launch_in_thread(job_path=str(export("killed_job", steps=500)))
    wait_for_steps(sent, thread)
    os.kill(started[0].process.pid, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive(), "the node hangs after its job was killed"
    error = out.get("error")
    assert isinstance(error, RuntimeError), out
    text = str(error)
    assert text.startswith("[Launch Train Job] the training job was killed by SIGKILL")
    assert "training killed_job: " in text and "1 rank(s)" in text  # its last lines of output
    assert "@lora_foundry.event" not in text  # events are not output lines
    assert len(text.splitlines()) <= launch.TAIL_LINES + 2


@pytest.mark.timeout(1800)
def test_cancel_stops_every_rank_and_keeps_a_loadable_checkpoint(dataset_dir, comfy_base, loras_dir, events):
    sent, started = events
    thread, out = launch_in_thread(job_path=str(export("cancelled", steps=500)), processes=2)
    wait_for_steps(sent, thread, count=2)
    comfy.model_management.interrupt_current_processing(True)
    thread.join(300)
    assert not thread.is_alive(), "the node did not stop after Cancel"
    assert isinstance(out.get("error"), comfy.model_management.InterruptProcessingException), out
    job = started[0]
    assert "torch.distributed.run" in job.argv and not job.running()
    assert job.process.returncode != 0  # it stopped, it did not finish
    folder = loras_dir / "cancelled"
    states = sorted(folder.glob("cancelled-step*.trainstate.json"))
    assert len(states) == 1, sorted(p.name for p in folder.iterdir())
    info = json.loads(states[0].read_text())
    assert info["world_size"] == 2 and len(sent) <= info["step"] < 500
    tensors, _ = read_state(states[0])
    assert tensors
    lora = states[0].name.replace(".trainstate.json", ".safetensors")
    assert weights(folder / lora)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp left behind
