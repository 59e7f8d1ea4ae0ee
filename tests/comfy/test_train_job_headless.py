"""Training jobs run headless (scripts/train_job.py in a subprocess) on the compact SD1.5 checkpoint (job_run.COMPACT):
the job exported by Export Train Job trains the same LoRA, metadata and state as Train LoRA in the
graph with the same settings, and bad job files stop with an error naming the field."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors
import torch
from job_run import COMPACT, SETTINGS, run_headless
from train_run import DATASET_ARGS, TRAIN_ARGS, make_dataset, train

from lora_foundry.nodes import comfy_bridge_job as job_bridge
from lora_foundry.nodes.train_job import ExportTrainJob

# values that name the run or its time, not what was trained
RUN_IDENTITY = {"ss_output_name", "ss_training_started_at", "ss_training_finished_at", "modelspec.title",
                "modelspec.date", "ss_session_id", "sshs_model_hash", "sshs_legacy_hash"}  # fmt: skip


@pytest.fixture(scope="module")
def demo(comfy_base, compact_sd15):
    model, clip, vae = job_bridge.load_checkpoint(str(comfy_base / "models" / "checkpoints" / compact_sd15))
    yield SimpleNamespace(model=model, clip=clip, vae=vae)
    import comfy.model_management

    del model, clip, vae
    comfy.model_management.unload_all_models()
    gc.collect()


def export(name: str, **changes) -> Path:
    dataset = {**DATASET_ARGS, "folder": "train_set"}
    settings = {**TRAIN_ARGS, **SETTINGS, "output_name": name, **changes}
    out = ExportTrainJob().execute(COMPACT, **dataset, **settings)
    return Path(out["result"][0])


def comparable(meta: dict) -> dict:
    """Metadata without the run's name and times, JSON values parsed (tag counts of equal frequency
    are listed in the order of the process's set iteration, so only their contents compare)."""
    out = {}
    for key, value in meta.items():
        if key not in RUN_IDENTITY:
            out[key] = json.loads(value) if value.startswith("{") else value
    return out


def read_lora(path: Path) -> tuple[dict, dict]:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (safe_open is no dict)


@pytest.mark.timeout(1800)
def test_headless_job_equals_train_lora_node(demo, dataset_dir, comfy_base, loras_dir):
    torch.set_num_threads(1)
    dataset, _ = make_dataset(demo)
    train(demo, dataset, output_name="node_run", **SETTINGS)
    job = export("job_run")
    assert job == comfy_base / "output" / "lora_foundry" / "jobs" / "job_run.json"
    done = run_headless(job, comfy_base)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2/2 loss" in done.stdout  # plain progress lines: stdout is a pipe here

    node_w, node_meta = read_lora(loras_dir / "node_run" / "node_run.safetensors")
    job_w, job_meta = read_lora(loras_dir / "job_run" / "job_run.safetensors")
    assert set(node_w) == set(job_w) and len(node_w) > 0
    diff = max((node_w[k].float() - job_w[k].float()).abs().max().item() for k in node_w)
    assert diff <= 1e-6, diff
    assert any(node_w[k].abs().max() > 0 for k in node_w if "lora_up" in k)  # it trained
    assert set(node_meta) == set(job_meta)
    assert comparable(node_meta) == comparable(job_meta)
    node_state = json.loads((loras_dir / "node_run" / "node_run.trainstate.json").read_text())
    job_state = json.loads((loras_dir / "job_run" / "job_run.trainstate.json").read_text())
    for key in ("step", "epoch", "position", "total_steps", "config", "history"):
        assert node_state[key] == job_state[key], key


@pytest.mark.timeout(600)
def test_bad_job_file_is_refused_naming_the_field(comfy_base, tmp_path):
    job = export("bad_job")
    doc = json.loads(job.read_text())
    doc["train"]["optimizer"] = "SGD9"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    done = run_headless(bad, comfy_base)
    assert done.returncode == 2
    assert "`train.optimizer` should be one of" in done.stderr
    assert not (comfy_base / "models" / "loras" / "bad_job").exists()


@pytest.mark.timeout(600)
def test_export_refuses_bad_name_naming_the_node(comfy_base, compact_sd15):
    with pytest.raises(RuntimeError, match=r"\[Export Train Job\] `output_name` .* path separator"):
        export("../escape")


def test_export_writes_the_key_names_option(comfy_base):
    assert (
        json.loads(export("named_job", key_names="diffusers").read_text())["output"]["key_names"]
        == "diffusers"
    )
    assert json.loads(export("default_named_job").read_text())["output"]["key_names"] == "kohya"
