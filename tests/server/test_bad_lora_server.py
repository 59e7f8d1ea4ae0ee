"""A broken LoRA in a real ComfyUI server: the prompt fails with our message, the server runs on.

The broken files are written after the server started: ComfyUI validates lora_name against its
cached file list, which it re-scans when the folder's mtime changes, so no restart is needed.
"""

from __future__ import annotations

import random
import struct

import pytest
from comfy_server import PromptFailed

pytestmark = pytest.mark.server

CHECKPOINT = "lora_foundry_demo_sd15.safetensors"


def lora_prompt(lora_name: str) -> dict:
    """Load Checkpoint -> Load LoRA (Foundry) -> Preview Any on the report."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {
            "class_type": "LoraFoundry_LoadLora",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": lora_name,
                "strength_model": 0.8,
                "strength_clip": 0.5,
                "block_weights": "",
            },
        },
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}},
    }


def execution_error(entry: dict) -> dict:
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1, entry["status"]
    return errors[0]


BROKEN = {
    "bad_truncated.safetensors": lambda: struct.pack("<Q", 4000) + b'{"a": {"dtype": "F32"',
    "bad_noise.safetensors": lambda: random.Random(7).randbytes(2048),
    "bad_empty.safetensors": lambda: b"",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_lora_fails_with_our_message_and_server_keeps_running(server, demo_models, server_loras, name):
    (server_loras / name).write_bytes(BROKEN[name]())
    listed = server.get("/object_info/LoraFoundry_LoadLora")["LoraFoundry_LoadLora"]["input"]["required"]
    assert name in listed["lora_name"][0], "a file written after start is not offered (stale file list)"

    with pytest.raises(PromptFailed) as e:
        server.run(lora_prompt(name), timeout=600)
    err = execution_error(e.value.entry)
    assert err["node_type"] == "LoraFoundry_LoadLora" and err["node_id"] == "2"
    assert err["exception_message"].startswith("[Load LoRA]") and name in err["exception_message"]

    good = server.run(lora_prompt(demo_models["lora"].name), timeout=600)
    report = good["outputs"]["3"]["text"][0]
    assert report.startswith(demo_models["lora"].name) and "NOT applied" not in report
    assert server.proc.poll() is None
    assert server.get("/system_stats")["system"]


def test_lora_removed_after_listing_fails_clearly(server, demo_models, server_loras):
    """A file deleted between validation's listing and execution: a clear error, not a crash."""
    (server_loras / "bad_gone.safetensors").write_bytes(b"")
    server.get("/object_info/LoraFoundry_LoadLora")
    (server_loras / "bad_gone.safetensors").unlink()
    try:
        server.run(lora_prompt("bad_gone.safetensors"), timeout=600)
    except PromptFailed as e:
        assert "bad_gone.safetensors" in execution_error(e.entry)["exception_message"]
    except RuntimeError as e:  # validation re-scanned the folder and refused the value: also fine
        assert "bad_gone.safetensors" in str(e) and "400" in str(e)
    else:
        pytest.fail("a missing LoRA loaded")
    assert server.run(lora_prompt(demo_models["lora"].name), timeout=600)["outputs"]["3"]["text"][0]
