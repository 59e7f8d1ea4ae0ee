"""Hostile LoRA files (issue #14) through a real ComfyUI server: Load LoRA returns promptly with
a note or a named error, and the server answers the next prompt.

Each prompt has its own timeout and each test a pytest-timeout guard: with the old code the
regex bomb held the worker forever, so these fail instead of hanging.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from comfy_server import PromptFailed
from safetensors.torch import save, save_file

pytestmark = pytest.mark.server

BOMB = r"(\w+\.?)+!"
CHECKPOINT = "lora_foundry_demo_sd15.safetensors"
STRENGTH = 0.8


def lora_prompt(lora_name: str) -> dict:
    """Load Checkpoint -> Load LoRA (Foundry) -> Preview Any on the report."""
    load = {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": STRENGTH,
            "strength_clip": 0.5, "block_weights": ""}  # fmt: skip
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoraFoundry_LoadLora", "inputs": load},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}},
    }


def execution_error(entry: dict) -> dict:
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1, entry["status"]
    return errors[0]


def demo_unet_layers(suffixes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Diffusers path -> weight shape of the demo SD1.5 UNet's layers ending in ``suffixes``."""
    import comfy.utils
    from make_demo_models import checkpoint_shapes
    from model_factory import SD15_FULL, sd15_unet_config

    shapes = checkpoint_shapes()
    to_ldm = comfy.utils.unet_to_diffusers(sd15_unet_config(SD15_FULL))
    return {
        d[: -len(".weight")]: tuple(shapes["model.diffusion_model." + ldm])
        for d, ldm in sorted(to_ldm.items())
        if d.endswith(suffixes) and ".attn1." in d
    }


def write_bomb(path) -> int:
    """A diffusers LoRA on the demo UNet's attn1 to_q/to_v whose header config has a regex bomb."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for layer, (d_out, d_in) in demo_unet_layers((".to_q.weight", ".to_v.weight")).items():
        sd[f"unet.{layer}.lora_A.weight"] = torch.randn(4, d_in, generator=g) * 0.01
        sd[f"unet.{layer}.lora_B.weight"] = torch.randn(d_out, 4, generator=g) * 0.01
    config = {"unet.lora_alpha": 8, "unet.alpha_pattern": {BOMB: 2, "to_v": 4}}
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    return len(sd) // 2


def write_hot(path) -> None:
    """A kohya LoRA on one demo layer with fp16 factors of 60000: finite, but its change is not."""
    layer, (d_out, d_in) = next(iter(demo_unet_layers((".to_q.weight",)).items()))
    name = "lora_unet_" + layer.replace(".", "_")
    sd = {
        f"{name}.lora_up.weight": torch.full((d_out, 2), 60000.0).half(),
        f"{name}.lora_down.weight": torch.full((2, d_in), 60000.0).half(),
    }
    save_file(sd, str(path))


def deep_header() -> bytes:
    blob = save(
        {"lora_unet_a.lora_up.weight": torch.ones(4, 2), "lora_unet_a.lora_down.weight": torch.ones(2, 3)}
    )
    (n,) = struct.unpack("<Q", blob[:8])
    text = blob[8 : 8 + n].decode().rstrip()[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    return struct.pack("<Q", len(text)) + text.encode() + blob[8 + n :]


def next_prompt_is_answered(server, demo_models) -> None:
    good = server.run(lora_prompt(demo_models["lora"].name), timeout=300)
    assert good["outputs"]["3"]["text"][0].startswith(demo_models["lora"].name)
    assert server.proc.poll() is None and server.get("/system_stats")["system"]


@pytest.mark.timeout(900)
def test_regex_bomb_in_header_loads_promptly_with_a_note(server, demo_models, server_loras):
    modules = write_bomb(server_loras / "hostile_bomb.safetensors")
    server.get("/object_info/LoraFoundry_LoadLora")  # re-scan the folder
    out = server.run(lora_prompt("hostile_bomb.safetensors"), timeout=300)
    report = out["outputs"]["3"]["text"][0]
    assert f"matched: unet {modules}" in report and "NOT applied" not in report
    assert f"{modules} modules scaled by the lora_alpha in the file's diffusers header" in report
    assert repr(BOMB) in report and "does not run expressions from files" in report
    next_prompt_is_answered(server, demo_models)


@pytest.mark.timeout(900)
def test_overflowing_factors_are_named_in_the_report(server, demo_models, server_loras):
    write_hot(server_loras / "hostile_hot.safetensors")
    server.get("/object_info/LoraFoundry_LoadLora")
    report = server.run(lora_prompt("hostile_hot.safetensors"), timeout=300)["outputs"]["3"]["text"][0]
    peak = STRENGTH * 2 * 60000.0 * 60000.0  # rank 2, every factor 60000
    assert "by more than 65504" in report and f"by up to {peak:.3g}" in report
    next_prompt_is_answered(server, demo_models)


HOSTILE = {
    "hostile_deep.safetensors": (deep_header, "nested too deeply"),
    "hostile_rank0.safetensors": (
        lambda: save({"lora_unet_a.lora_up.weight": torch.ones(4, 0), "lora_unet_a.lora_down.weight": torch.ones(0, 3)}),
        "module 'lora_unet_a' has rank 0",
    ),
    "hostile_int.safetensors": (
        lambda: save({"lora_unet_a.lora_up.weight": torch.ones(4, 2, dtype=torch.int32),
                      "lora_unet_a.lora_down.weight": torch.ones(2, 3, dtype=torch.int32)}),
        "is int32, but a LoRA's weights are floating point",
    ),
}  # fmt: skip


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_fails_by_name_and_server_runs_on(server, demo_models, server_loras, name):
    content, message = HOSTILE[name]
    (server_loras / name).write_bytes(content())
    server.get("/object_info/LoraFoundry_LoadLora")
    with pytest.raises(PromptFailed) as e:
        server.run(lora_prompt(name), timeout=300)
    text = execution_error(e.value.entry)["exception_message"]
    assert text.startswith(f"[Load LoRA] {name}") and message in text
    next_prompt_is_answered(server, demo_models)
