"""Issue #14 through a real ComfyUI server: hostile inputs anyone reaching the port can POST (a
100-billion-block range, an out-of-model block weight, a huge rows_json) fail promptly with the
pack's message and the server answers the next prompt; a re-queued Merge LoRAs whose file was
deleted writes it again, while an identical re-queue with the file in place stays cached.

Every test carries a timeout, and every prompt a deadline, so a regression fails instead of hanging.
"""

from __future__ import annotations

import json

import pytest
from comfy_server import PromptFailed

pytestmark = pytest.mark.server

CHECKPOINT = "lora_foundry_demo_sd15.safetensors"
PROMPT_DEADLINE_S = 300  # generous for a cold checkpoint load on 2 shared cores; a hang is not


def defaults(object_info: dict, node: str) -> dict:
    """Every widget input of a node at its default (a combo at its first choice)."""
    spec = object_info[node]["input"]
    values = {}
    for name, entry in {**spec.get("required", {}), **spec.get("optional", {})}.items():
        kind, opts = entry[0], entry[1] if len(entry) > 1 else {}
        if isinstance(kind, list):
            values[name] = opts.get("default", kind[0] if kind else None)
        elif "default" in opts:
            values[name] = opts["default"]
    return values


def failure(server, prompt: dict) -> dict:
    with pytest.raises(PromptFailed) as e:
        server.run(prompt, timeout=PROMPT_DEADLINE_S)
    errors = [data for kind, data in e.value.entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1, e.value.entry["status"]
    return errors[0]


def load_lora_prompt(lora: str, block_weights: str = "") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {
            "class_type": "LoraFoundry_LoadLora",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": lora,
                "strength_model": 0.8,
                "strength_clip": 0.5,
                "block_weights": block_weights,
            },
        },  # fmt: skip
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}},
    }


def assert_server_answers(server, demo_models):
    good = server.run(load_lora_prompt(demo_models["lora"].name), timeout=PROMPT_DEADLINE_S)
    assert good["outputs"]["3"]["text"][0].startswith(demo_models["lora"].name)
    assert server.proc.poll() is None and server.get("/system_stats")["system"]


@pytest.mark.timeout(900)
def test_huge_train_blocks_range_fails_promptly(server, object_info, demo_models):
    dataset = {**defaults(object_info, "LoraFoundry_TrainingDataset"), "folder": demo_models["dataset"].name,
               "resolution": 64, "vae": ["1", 2], "clip": ["1", 1]}  # fmt: skip
    train = {**defaults(object_info, "LoraFoundry_TrainLora"), "model": ["1", 0], "clip": ["1", 1],
             "dataset": ["2", 0], "output_name": "bounds_huge_blocks", "steps": 2, "blocks": "in0-99999999999"}  # fmt: skip
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoraFoundry_TrainingDataset", "inputs": dataset},
        "3": {"class_type": "LoraFoundry_TrainLora", "inputs": train},
    }
    err = failure(server, prompt)
    assert err["node_type"] == "LoraFoundry_TrainLora"
    assert err["exception_message"].startswith("[Train LoRA] `blocks` entry 'IN0-99999999999'")
    assert "input blocks are IN00-IN11" in err["exception_message"]
    assert not (
        server.base_dir / "models" / "loras" / "bounds_huge_blocks" / "bounds_huge_blocks.safetensors"
    ).exists()
    assert_server_answers(server, demo_models)


@pytest.mark.timeout(900)
def test_out_of_model_block_weight_fails_promptly(server, demo_models):
    err = failure(server, load_lora_prompt(demo_models["lora"].name, "IN99999999999=1"))
    assert err["node_type"] == "LoraFoundry_LoadLora"
    assert "`block_weights` entry 'IN99999999999=1'" in err["exception_message"]
    assert err["exception_message"].startswith("[Load LoRA]")
    assert_server_answers(server, demo_models)


def stack_prompt(object_info, rows_json: str) -> dict:
    stack = {**defaults(object_info, "LoraFoundry_LoraStack"), "rows_json": rows_json}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoraFoundry_LoraStack", "inputs": stack},
        "3": {
            "class_type": "LoraFoundry_ApplyLoraStack",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_stack": ["2", 0]},
        },
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 3]}},
    }


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["300 rows", "4 MB"])
def test_huge_rows_json_fails_promptly(server, object_info, demo_models, kind):
    lora = demo_models["lora"].name
    if kind == "300 rows":
        rows, expected = json.dumps([{"lora": lora, "on": True}] * 300), "rows_json has 300 rows; at most 64"
    else:
        rows = json.dumps([{"lora": lora, "block_weights": "x" * 4_000_000}])
        expected = f"rows_json is {len(rows)} bytes; at most 128 KiB"
    err = failure(server, stack_prompt(object_info, rows))
    assert err["node_type"] == "LoraFoundry_LoraStack"
    assert err["exception_message"].startswith(f"[LoRA Stack] {expected}")
    assert_server_answers(server, demo_models)


@pytest.mark.timeout(900)
def test_requeued_merge_writes_its_deleted_file_again(server, object_info, demo_models, server_loras):
    name = "bounds_requeued_merge"
    path = server_loras / f"{name}.safetensors"
    stack = {**defaults(object_info, "LoraFoundry_LoraStack"), "lora_1": demo_models["lora"].name}
    merge = {**defaults(object_info, "LoraFoundry_MergeLoras"), "model": ["1", 0], "lora_stack": ["2", 0],
             "method": "concat", "output_name": name, "overwrite": False}  # fmt: skip
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoraFoundry_LoraStack", "inputs": stack},
        "3": {"class_type": "LoraFoundry_MergeLoras", "inputs": merge},
    }
    first = server.run(prompt, timeout=PROMPT_DEADLINE_S)
    assert first["outputs"]["3"]["lora_written"] == [path.name]
    written = path.stat().st_mtime_ns
    # identical, file in place: cached (a re-run would fail, since overwrite is off)
    server.run(prompt, timeout=PROMPT_DEADLINE_S)
    assert path.stat().st_mtime_ns == written
    path.unlink()
    again = server.run(prompt, timeout=PROMPT_DEADLINE_S)
    assert path.exists(), "the re-queued merge did not run again after its file was deleted"
    assert again["outputs"]["3"]["lora_written"] == [path.name]
    assert not [p.name for p in server_loras.iterdir() if p.name.startswith(".")], "temp files left behind"
